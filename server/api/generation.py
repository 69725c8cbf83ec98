"""One API request -> n engine requests -> text deltas per choice, with per-adapter metrics.

The adapter lease is held for the whole generation and released in ``finally``, whatever ends it
(finish, stop string, client disconnect, error); engine requests still running are aborted there too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.adapters.registry import version_label
from server.api.errors import APIError
from server.api.protocol import SamplingFields
from server.api.streaming import IncrementalDetokenizer, StopStringFilter
from server.engine.types import Request, SamplingParams, TokenEvent, TopLogprob
from server.metrics import BASE_LABEL

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from server.adapters.registry import AdapterLease, AdapterRegistry
    from server.engine.engine import Engine
    from server.metrics import ServerMetrics


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class ChoiceDelta:
    """Text added to choice ``index``; ``finish_reason`` set on its last delta."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


def sampling_params(
    body: SamplingFields, max_tokens: int | None, logprobs: int | None, limit: int
) -> SamplingParams:
    """Request fields -> engine params; max_tokens above the server's limit is a 400 naming the field."""
    if max_tokens is not None and max_tokens > limit:
        raise APIError(
            400, f"max_tokens: at most {limit} (server limit)", param="max_tokens", code="invalid_value"
        )
    return SamplingParams(
        max_tokens=max_tokens or limit,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        stop_token_ids=frozenset(body.stop_token_ids or ()),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logprobs=logprobs,
    )


class Generation:
    """Runs the n choices of one request and yields their deltas, interleaved as they come."""

    def __init__(
        self,
        *,
        engine: Engine,
        registry: AdapterRegistry,
        tokenizer: PreTrainedTokenizerBase,
        metrics: ServerMetrics,
        prompt_ids: list[int],
        params: SamplingParams,
        n: int,
        stops: list[str],
        lease: AdapterLease | None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.prompt_ids = prompt_ids
        self.params = params
        self.n = n
        self.stops = stops
        self.lease = lease
        self.adapter_label = lease.name if lease is not None else BASE_LABEL
        self.labels = {
            "adapter": self.adapter_label,
            "version": version_label(lease.version) if lease is not None else BASE_LABEL,
        }
        self.usage = Usage(prompt_tokens=len(prompt_ids))
        self.request_ids = [uuid.uuid4().hex for _ in range(n)]
        self.arrival = time.perf_counter()
        self.status = "ok"

    def _params_for(self, index: int) -> SamplingParams:
        # n > 1 with a seed: each choice its own reproducible seed, or they would all be equal.
        if self.params.seed is None or index == 0:
            return self.params
        from dataclasses import replace

        return replace(self.params, seed=self.params.seed + index)

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Submit (raises QueueFull/PromptTooLong/EngineStopped before anything is sent) and stream."""
        streams = []
        try:
            for i, request_id in enumerate(self.request_ids):
                request = Request(request_id, self.prompt_ids, self._params_for(i), self.lease)
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
        except BaseException:
            self.status = "error"
            raise
        finally:
            for request_id in self.request_ids[: len(streams)]:
                self.engine.abort(request_id)  # no-op for finished ones; frees slots otherwise
            if self.lease is not None:
                self.registry.release(self.lease)
            self._record_request()

    async def _pump(self, index: int, stream: AsyncIterator[TokenEvent], queue: asyncio.Queue) -> None:
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStringFilter(self.stops)
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
                if event.error is not None:
                    raise RuntimeError(event.error)
                text = ""
                logprobs: list[TokenLogprob] = []
                if event.token_id is not None and not (event.finish_reason == "stop" and not stops.stopped):
                    text = stops.push(detok.add(event.token_id))
                    if event.logprob is not None:
                        logprobs.append(self._logprob(event.token_id, event.logprob, event.top_logprobs))
                finish = event.finish_reason
                if stops.stopped and finish is None:
                    finish = "stop"
                    self.engine.abort(self.request_ids[index])
                if finish is not None:
                    text += stops.flush()
                    self.usage.completion_tokens += event.output_tokens
                    await queue.put(
                        ChoiceDelta(index, text, "stop" if finish == "abort" else finish, logprobs)
                    )
                    return
                if text or logprobs:
                    await queue.put(ChoiceDelta(index, text, None, logprobs))
        except Exception as exc:
            await queue.put(exc)

    def _logprob(self, token_id: int, logprob: float, top: tuple[TopLogprob, ...]) -> TokenLogprob:
        decode = self.tokenizer.convert_ids_to_tokens
        return TokenLogprob(
            str(decode(token_id)), logprob, [(str(decode(t.token_id)), t.logprob) for t in top]
        )

    def _record_request(self) -> None:
        labels = self.labels
        self.metrics.e2e_latency.labels(**labels).observe(time.perf_counter() - self.arrival)
        self.metrics.prompt_tokens.labels(**labels).observe(self.usage.prompt_tokens)
        self.metrics.output_tokens.labels(**labels).observe(self.usage.completion_tokens)
        self.metrics.requests.labels(**labels, status=self.status).inc()
