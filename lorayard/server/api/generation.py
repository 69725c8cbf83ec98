"""Run an :class:`EngineJob`: lease its adapter, submit its n choices, yield their deltas.

The adapter lease has one owner, :func:`adapter_lease`, held for exactly as long as the generation
runs (a streamed response outlives its route, so the lease lives in the delta generator, not the
route). Responses are built from the deltas in :mod:`lorayard.server.api.responses`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from lorayard.server.api.errors import APIError, EngineFailed
from lorayard.server.api.serving import job_for_version
from lorayard.server.api.streaming import IncrementalDetokenizer, StopStringFilter
from lorayard.server.api.tool_calls import marker_token_ids
from lorayard.server.engine.types import (
    InvalidRequest,
    PromptLogprob,
    Request,
    SamplingParams,
    TokenEvent,
    TopLogprob,
)
from lorayard.server.metrics import BASE_LABEL, UNRESOLVED_LABEL, adapter_labels
from lorayard.volume import AdapterNotFound

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lorayard.server.adapters.registry import AdapterLease, AdapterRegistry
    from lorayard.server.api.serving import EngineJob
    from lorayard.server.runtime import ReadyRuntime


DISCONNECT_POLL_S = 0.5
"""How often a request waiting for its grammar checks whether its client is still there."""


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's logprob; ``text_offset``: where its text starts in the choice's output."""

    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...]
    text_offset: int


@dataclass
class ChoiceDelta:
    """Text added to choice ``index``; ``finish_reason`` set on its last delta."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None
    """On a choice's first delta when the job scores its prompt: one entry per prompt token."""


class ChoiceOutput:
    """One choice's output: the engine's token events in, text deltas out. Detokenizes (never half a
    character), cuts at stop strings, places each token's logprob at its text offset, and finishes
    (a stop string finishes the choice before the engine does: ``stopped_by_string``)."""

    def __init__(
        self,
        index: int,
        tokenizer: PreTrainedTokenizerBase,
        stops: list[str],
        kept: frozenset[int] = frozenset(),
    ) -> None:
        """``kept``: special tokens whose text stays in the output (a tool format's markers)."""
        self.index = index
        self._detok = IncrementalDetokenizer(tokenizer, kept=kept)
        self._stops = StopStringFilter(stops)
        self._produced = 0  # characters decoded so far: the next token's text_offset
        self._prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None

    @property
    def stopped_by_string(self) -> bool:
        return self._stops.stopped

    def add(self, event: TokenEvent) -> ChoiceDelta | None:
        """The delta this event adds (None while nothing is ready); raises EngineFailed for a failed row."""
        if event.error is not None:
            raise EngineFailed(event.error)
        if event.prompt_logprobs is not None:
            self._prompt_logprobs = event.prompt_logprobs
        stops = self._stops
        text, logprobs = "", []
        # The token of a "stop" finish is the end-of-turn token: it is not text.
        ends_on_stop_token = event.finish_reason == "stop" and not stops.stopped
        if event.token_id is not None and not ends_on_stop_token:
            piece = self._detok.add(event.token_id)
            text = stops.push(piece)
            if event.logprob is not None and not stops.stopped:
                logprobs.append(
                    TokenLogprob(event.token_id, event.logprob, event.top_logprobs, self._produced)
                )
            self._produced += len(piece)
        elif event.token_id is not None and event.logprob is not None:
            # The end-of-sequence (or stop) token adds no text but was generated and is counted in
            # usage: vLLM lists it, and scorers (lm-evaluation-harness reads token_logprobs[ctxlen:-1])
            # count on that entry being there.
            logprobs.append(TokenLogprob(event.token_id, event.logprob, event.top_logprobs, self._produced))
        finish = event.finish_reason
        if stops.stopped and finish is None:
            finish = "stop"
        if finish is not None:
            text += stops.push(self._detok.flush()) + stops.flush()
            reason = "stop" if finish == "abort" else finish
            return ChoiceDelta(self.index, text, reason, logprobs, self._prompt_logprobs)
        if text or logprobs or self._prompt_logprobs is not None:
            delta = ChoiceDelta(self.index, text, None, logprobs, self._prompt_logprobs)
            self._prompt_logprobs = None
            return delta
        return None


@dataclass
class UsageCount:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (the most any of the request's choices found)."""


@contextlib.asynccontextmanager
async def adapter_lease(
    registry: AdapterRegistry, ref: str | None, param: str, user: str | None = None
) -> AsyncIterator[AdapterLease | None]:
    """The adapter pinned for the body of the ``async with`` (a canary split routes ``user``);
    released however it ends."""
    if ref is None:
        yield None
        return
    try:
        lease = await registry.acquire(ref, user)
    except AdapterNotFound as exc:
        raise APIError(404, str(exc), param=param, code="adapter_not_found") from exc
    try:
        yield lease
    finally:
        registry.release(lease)


class Generation:
    """The n choices of one job, their deltas interleaved as they come."""

    def __init__(self, runtime: ReadyRuntime, job: EngineJob) -> None:
        assert runtime.engine is not None and runtime.registry is not None
        self.engine = runtime.engine
        self.registry = runtime.registry
        self.tokenizer = runtime.tokenizer
        self.metrics = runtime.metrics
        self.settings = runtime.settings
        self.runtime = runtime
        self._admitted = runtime.admitted
        self.job = job
        self.prompt_ids = job.prompt_ids
        unresolved = BASE_LABEL if job.adapter is None else UNRESOLVED_LABEL
        self.labels = {"adapter": unresolved, "version": unresolved}
        """Metric labels: the adapter and version that served (``unresolved`` until leased)."""
        self.lease: AdapterLease | None = None
        self.usage = UsageCount(prompt_tokens=len(job.prompt_ids))
        self.request_ids = [uuid.uuid4().hex for _ in range(job.n)]
        self.arrival = time.perf_counter()
        tools = job.tools
        self._markers = frozenset() if tools is None else marker_token_ids(self.tokenizer, tools.format)
        """The tool format's special tokens, kept in the text the tool-call parser reads."""

    def _params_for(self, index: int) -> SamplingParams:
        # n > 1 with a seed: each choice its own reproducible seed, or they would all be equal.
        params = self.job.params
        if params.seed is None or index == 0:
            return params
        return replace(params, seed=params.seed + index)

    async def _compile_grammar_unless_gone(self, client_gone: Callable[[], Awaitable[bool]] | None) -> None:
        """:meth:`_compile_grammar`, abandoned if the client disconnects first: a compile still waiting
        for a grammar thread then never runs (a running one cannot be stopped; it ends, bounded by
        the schema limits, and its grammar is cached)."""
        compiling = asyncio.ensure_future(self._compile_grammar())
        while True:
            done, _ = await asyncio.wait({compiling}, timeout=DISCONNECT_POLL_S)
            if done:
                compiling.result()
                return
            if client_gone is not None and await client_gone():
                compiling.cancel()
                await asyncio.gather(compiling, return_exceptions=True)
                # Nobody reads it; answered (not raised) so the access log and the request
                # counter see it, under nginx's status for a client that closed the request.
                raise APIError(499, "the client closed the connection", code="client_closed_request")

    async def _compile_grammar(self) -> None:
        """A new schema compiles (milliseconds, cached) on the grammar pool, before submit; one the
        grammar library refuses, or that compiles past the server's limit, is a 400 naming the field
        it came from."""
        guided, compiler = self.job.params.guided, self.engine.guided
        if guided is None or compiler is None:
            return  # None: submit refuses it (structured output unavailable)
        timeout_s = self.settings.grammar_compile_timeout
        try:
            await compiler.compile_bounded(guided, timeout_s)
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=self.job.guided_param, code="invalid_value") from exc
        except TimeoutError:
            raise APIError(
                400,
                f"{self.job.guided_param}: the JSON schema's grammar took longer than {timeout_s:g} s to"
                " compile (server limit --grammar-compile-timeout): send a smaller schema",
                param=self.job.guided_param,
                code="grammar_compile_timeout",
            ) from None

    async def deltas(
        self, client_gone: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncGenerator[ChoiceDelta, None]:
        """Lease (the version decides the prompt and the grammar), compile, submit (raises
        QueueFull/PromptTooLong/EngineStopped before anything is sent), stream. Admitted for a drain
        from the first step to the last (a grammar compiling or an adapter loading is as much in
        flight as a row in the engine). ``client_gone``: polled while the grammar compiles
        (Starlette's ``Request.is_disconnected``)."""
        with self._admitted():
            async for delta in self._leased_deltas(client_gone):
                yield delta

    async def _leased_deltas(
        self, client_gone: Callable[[], Awaitable[bool]] | None
    ) -> AsyncGenerator[ChoiceDelta, None]:
        # Lease first: the version decides the prompt and the tool-call format, so the grammar too.
        job = self.job
        async with adapter_lease(self.registry, job.adapter, job.adapter_param, job.user) as lease:
            if lease is not None:
                self.lease = lease
                self.labels = adapter_labels(lease.name, lease.version)
                self._serve_as(lease)
            await self._compile_grammar_unless_gone(client_gone)
            job = self.job
            streams = []
            try:
                for i, request_id in enumerate(self.request_ids):
                    request = Request(request_id, self.prompt_ids, self._params_for(i), lease, job.images)
                    streams.append(self.engine.submit(request))
                queue: asyncio.Queue[ChoiceDelta | BaseException] = asyncio.Queue()
                tasks = [asyncio.create_task(self._pump(i, s, queue)) for i, s in enumerate(streams)]
                try:
                    remaining = len(tasks)
                    while remaining:
                        item = await queue.get()
                        if isinstance(item, BaseException):
                            raise item
                        if item.finish_reason is not None:
                            remaining -= 1
                        yield item
                finally:
                    for task in tasks:
                        task.cancel()
            finally:
                for request_id in self.request_ids[: len(streams)]:
                    self.engine.abort(request_id)  # no-op for finished ones; frees slots otherwise
                self._record_latencies()

    def _serve_as(self, lease: AdapterLease) -> None:
        """A chat job is rendered, constrained and parsed as the leased version was trained: its own
        prompt template, its tool-call format (:func:`job_for_version`)."""
        self.job = job_for_version(self.runtime, self.job, lease)
        self.prompt_ids = self.job.prompt_ids
        self.usage.prompt_tokens = len(self.prompt_ids)
        tools = self.job.tools
        self._markers = frozenset() if tools is None else marker_token_ids(self.tokenizer, tools.format)

    @property
    def adapter_label(self) -> str:
        return self.labels["adapter"]

    async def _pump(self, index: int, stream: AsyncIterator[TokenEvent], queue: asyncio.Queue) -> None:
        output = ChoiceOutput(index, self.tokenizer, self.job.stops, self._markers)
        labels = self.labels
        last_time: float | None = None
        try:
            async for event in stream:
                now = time.perf_counter()
                if event.token_id is not None:
                    if last_time is None:
                        self.metrics.time_to_first_token.labels(**labels).observe(now - self.arrival)
                    else:
                        self.metrics.inter_token_latency.labels(**labels).observe(now - last_time)
                    last_time = now
                delta = output.add(event)
                if output.stopped_by_string and event.finish_reason is None:
                    self.engine.abort(self.request_ids[index])  # the engine need not go on
                if delta is not None and delta.finish_reason is not None:
                    self.usage.completion_tokens += event.output_tokens
                    self._record_prefix_lookup(event)
                    await queue.put(delta)
                    return
                if delta is not None:
                    await queue.put(delta)
        except Exception as exc:
            await queue.put(exc)

    def _record_prefix_lookup(self, event: TokenEvent) -> None:
        """The prefix-cache hit metric, per adapter version, for a request the engine admitted."""
        if event.cached_tokens is None:
            return
        self.usage.cached_tokens = max(self.usage.cached_tokens, event.cached_tokens)
        self.metrics.prefix_cache_queries.labels(**self.labels).inc(event.prompt_tokens)
        self.metrics.prefix_cache_hits.labels(**self.labels).inc(event.cached_tokens)

    def _record_latencies(self) -> None:
        labels = self.labels
        self.metrics.e2e_latency.labels(**labels).observe(time.perf_counter() - self.arrival)
        self.metrics.prompt_tokens.labels(**labels).observe(self.usage.prompt_tokens)
        self.metrics.output_tokens.labels(**labels).observe(self.usage.completion_tokens)
