"""The engine: continuous batching of requests for many adapters over one base model.

All torch work runs on one engine thread. Each iteration (:meth:`Engine._step`):

1. takes new requests and aborts from the API (thread-safe hand-off); aborted requests are retired
   by the scheduler, then told;
2. asks the scheduler (:mod:`lorayard.server.engine.scheduler`, torch-free) for the pass plan: it admits
   waiting requests FIFO while ``max_batch_size`` and free KV blocks allow, reusing the longest cached
   prefix computed under the same weights, and plans one token for each decoding row and prompt
   chunks of the newcomers, up to ``prefill_chunk`` prompt tokens per iteration (batched chunked
   prefill, so a long prompt never stalls running streams for long; ``idle_prefill_chunk`` when no
   row decodes, so a lone prompt is one pass);
3. runs ONE forward pass over the plan, samples a token for every row whose pending tokens are all
   computed, retires finished rows (their blocks go back first), then sends each event to its
   request's asyncio queue; the scheduler gives every other row room for its next token, preempting
   the most recently admitted request when the pool runs dry (its stream only pauses);
4. publishes the step's :class:`EngineStats`: the only engine state other threads read (``stats()``,
   ``idle``, ``check_kv``), and what :mod:`lorayard.server.metrics` turns into gauges.

Failures are per row: an exception while sampling or accepting one row's token finishes that row
alone with an error event; a failing forward pass is retried in halves, so only the rows whose own
forward fails (an adapter gone, ...) are failed and their blocks freed, and the engine keeps serving.
:meth:`Engine.submit` refuses token ids outside the vocabulary (:class:`InvalidRequest`) before they
can index a tensor (on a GPU an out-of-range index is a device-side assert that poisons the process).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from lorayard.adapter_files import AdapterWeights
from lorayard.architectures import architecture_for, exact_context_limit, language_config
from lorayard.base_model import ResolvedBaseModel, default_device, load_base_model
from lorayard.server.engine.block_pool import (
    BlockPool,
    BlockSpec,
    KVBlockStorage,
    adapter_identity,
    blocks_for_budget,
)
from lorayard.server.engine.config import default_max_batch_size, resolve_decode_mode, weight_dtype
from lorayard.server.engine.lora_ops import ResidentAdapter
from lorayard.server.engine.model_runner import ModelRunner, PassRow, StaticDecode
from lorayard.server.engine.request_rules import check_context, check_min_tokens, check_token_ids
from lorayard.server.engine.sampler import (
    SampledToken,
    SequenceState,
    greedy_tokens,
    sample_row,
    score_tokens,
)
from lorayard.server.engine.scheduler import PlannedRow, Scheduler, Sequence
from lorayard.server.engine.types import (
    BlockAccountingError,
    EngineStats,
    EngineStopped,
    FinishReason,
    InvalidRequest,
    PromptLogprob,
    QueueFull,
    Request,
    TokenEvent,
)
from lorayard.server.engine.vision import VisionPrompt, check_images, encode_images, rope_prompt

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from transformers import PretrainedConfig, PreTrainedModel

    from lorayard.server.engine.config import EngineConfig
    from lorayard.server.engine.guided import GuidedCompiler, GuidedMatcher
    from lorayard.server.metrics import ServerMetrics

log = logging.getLogger("lorayard.engine")


@dataclasses.dataclass(eq=False, kw_only=True)
class _Sequence(Sequence):
    """The scheduler's sequence plus what only the engine thread touches: sampler state, the stream."""

    state: SequenceState
    """Its ``output_ids`` is the scheduler's list (one list, appended by the engine only)."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent]
    vision: VisionPrompt | None = None
    """Its M-RoPE positions, computed on its first planned pass, and its images' embeddings, on the
    first pass that computes an image-pad token (never when the prefix cache holds them all)."""

    @property
    def adapter_slot(self) -> int | None:
        return None if self.request.adapter is None else self.request.adapter.slot


class RequestStream:
    """Async iterator over one request's :class:`TokenEvent` s; ends after the finishing event."""

    def __init__(self, request_id: str, queue: asyncio.Queue[TokenEvent]) -> None:
        self.request_id = request_id
        self._queue = queue
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event.finish_reason is not None:
            self._done = True
        return event


class Engine:
    """See the module docstring; the public surface is documented in ``lorayard/server/engine/types.py``."""

    def __init__(
        self,
        model: PreTrainedModel,
        engine_config: EngineConfig,
        *,
        eos_token_ids: set[int],
        metrics: ServerMetrics | None = None,
        fuse_linears: bool | None = None,
        guided: GuidedCompiler | None = None,
        prepack: bool = False,
    ) -> None:
        """``fuse_linears``: the model runner's choice (default: fused on a GPU only). ``prepack``: the
        runner packs the base's linears where the CPU and dtype gain from it (bf16), replacing the
        model's modules (``from_base``, which owns its model, asks for it). ``guided``:
        structured output's grammar compiler for the served tokenizer (None: requests with ``guided``
        are refused); the runtime sets it once the tokenizer is loaded."""
        self.model = model
        self.engine_config = engine_config
        self.hf_config: PretrainedConfig = model.config
        """The base's Hugging Face config (``engine_config`` is ours: batch, KV budget, decode mode)."""
        architecture_for(self.hf_config)  # UnsupportedArchitecture before anything is sized from it
        self.device = str(next(model.parameters()).device)
        self.dtype = model.dtype
        wanted_len = engine_config.max_model_len
        self.max_model_len = min(
            wanted_len,
            int(getattr(language_config(self.hf_config), "max_position_embeddings", wanted_len)),
            exact_context_limit(self.hf_config) or wanted_len,
        )
        self.max_queue = engine_config.max_queue
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size = int(language_config(self.hf_config).vocab_size)
        """Width of the logits: every token id a request carries must be below it."""
        self.metrics = metrics
        self._guided: GuidedCompiler | None = None
        self.guided = guided
        self._grammar_thread: ThreadPoolExecutor | None = None
        """Fills constrained rows' token masks while the forward pass runs (created on first use)."""
        spec = BlockSpec.of_model(self.hf_config, self.dtype)
        self.max_batch_size = engine_config.max_batch_size or default_max_batch_size(self.device)
        # The budget is a ceiling: more blocks than max_batch_size requests at full length could use
        # would only hold cold prefix cache (and on the CPU, memory the pages never needed).
        num_blocks = min(
            blocks_for_budget(spec, engine_config.kv_cache_memory_gb, self.device, self.max_model_len),
            self.max_batch_size * spec.blocks_for_tokens(self.max_model_len),
        )
        self.decode_mode = resolve_decode_mode(
            engine_config.decode_mode, self.device, engine_config.quantization
        )
        static = None
        if self.decode_mode != "eager":
            # One storage block past the pool's, which no request can own: the static decode step's
            # padded rows write their K/V there.
            static = StaticDecode(
                self.decode_mode,
                self.max_batch_size,
                self.max_model_len,
                scratch_block=num_blocks,
                stack_capacity=engine_config.max_loaded_adapters,
            )
        self.kv = KVBlockStorage(spec, num_blocks + (static is not None), self.device)
        self.pool = BlockPool(num_blocks, spec.block_size, prefix_caching=engine_config.prefix_caching)
        self.runner = ModelRunner(model, self.kv, fuse_linears, static, prepack=prepack)
        self.scheduler: Scheduler[_Sequence] = Scheduler(
            self.pool,
            max_batch_size=self.max_batch_size,
            prefill_chunk=engine_config.prefill_chunk,
            idle_prefill_chunk=engine_config.idle_prefill_chunk,
        )
        """Waiting and running requests: touched by the engine thread only."""
        self._pool_ids = itertools.count()
        self._adapter_slots = itertools.count()
        self._lock = threading.Lock()
        """Guards the hand-off to the engine thread (incoming, aborts) and the published snapshot."""
        self._wakeup = threading.Event()
        self._incoming: collections.deque[_Sequence] = collections.deque()
        self._aborts: set[str] = set()
        self._snapshot: EngineStats = self.scheduler.stats()
        """The last step's figures, published by the engine thread: what other threads read."""
        if metrics is not None:  # every protocol family is there before the first request
            metrics.log_engine_config(
                max_lora=engine_config.max_loaded_adapters, block_size=spec.block_size, num_blocks=num_blocks
            )
            metrics.log_engine_stats(self._snapshot)
        self._draining = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_base(
        cls,
        base: ResolvedBaseModel,
        engine_config: EngineConfig,
        *,
        eos_token_ids: set[int],
        dtype: torch.dtype | None = None,
        metrics: ServerMetrics | None = None,
        fuse_linears: bool | None = None,
    ) -> Engine:
        """Load the base on the config's device (optionally 4-bit/8-bit) and build an engine over it;
        ``dtype`` None: the config's ``dtype`` (auto: the device's default, float32 on the CPU, bf16 on
        a GPU).

        Raises UnsupportedArchitecture for a base we cannot serve exactly: from its config before any
        weight is read, or when the parity probe finds our forward disagreeing with transformers'.
        """
        from transformers import AutoConfig

        from lorayard.server.engine.parity_probe import check_runner_parity

        architecture_for(AutoConfig.from_pretrained(base.path))
        device = engine_config.device or default_device()
        model = load_base_model(
            base,
            device=device,
            dtype=dtype or weight_dtype(engine_config.dtype, device),
            quantization=engine_config.quantization,
        )
        model.eval()
        engine = cls(
            model,
            engine_config,
            eos_token_ids=eos_token_ids,
            metrics=metrics,
            fuse_linears=fuse_linears,
            prepack=True,  # both of the probe's forwards run the packed modules: equal to F.linear's (bf16)
        )
        check_runner_parity(model, engine.runner)
        return engine

    @property
    def guided(self) -> GuidedCompiler | None:
        """Structured output's grammar compiler; None: requests with ``guided`` are refused."""
        return self._guided

    @guided.setter
    def guided(self, compiler: GuidedCompiler | None) -> None:
        # A narrower mask would leave the logits past its end unmasked: a silent wrong answer.
        if compiler is not None and compiler.vocab_size != self.vocab_size:
            raise ValueError(
                f"the grammar compiler's vocabulary ({compiler.vocab_size}) is not the width of the "
                f"model's logits ({self.vocab_size})"
            )
        self._guided = compiler

    # -- adapters (called by the registry, from worker threads) ---------------------------------
    def load_adapter_weights(self, key: str, weights: AdapterWeights, folder: Path | None = None) -> int:
        """Make an adapter resident; returns its slot. DoRA's row scale is computed here, once.
        ``folder`` is not read again: ``weights`` are its files, already validated."""
        del folder
        dense = biases = None
        if weights.uses_dora:
            dora = [k for k, m in weights.modules.items() if m.magnitude is not None]
            dense = {k: self.runner.dense_weight(*k) for k in dora}
            biases = {k: b for k in dora if (b := self.runner.dense_bias(*k)) is not None}
        resident = ResidentAdapter.from_weights(
            key, weights, dense, device=self.device, dtype=self.dtype, base_bias=biases
        )
        # Never reused (itertools.count): adapter_identity keys the prefix cache on it. The runner maps
        # it to a stacked row of its own, which is reused.
        slot = next(self._adapter_slots)
        self.runner.add_adapter(slot, resident)
        return slot

    def free_adapter_weights(self, slot: int) -> None:
        self.runner.remove_adapter(slot)

    # -- API side (event loop thread) -----------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorayard-engine", daemon=True)
            self._thread.start()

    def submit(self, request: Request) -> RequestStream:
        """Queue a request; raises InvalidRequest, PromptTooLong, QueueFull or EngineStopped."""
        if self._draining or self._stopped.is_set():
            raise EngineStopped("the server is shutting down")
        self._validate(request)
        guide = None
        if request.params.guided is not None:
            if self.guided is None:
                raise InvalidRequest("structured output is not available on this engine", "guided")
            guide = self.guided.matcher(request.params.guided)  # compiles (cached by schema text)
        return self._enqueue(request, guide)

    def _validate(self, request: Request) -> None:
        """The engine's own guard (the API validates first): whatever indexes a tensor is checked."""
        params = request.params
        prompt_len = len(request.prompt_ids)
        if prompt_len == 0:
            raise InvalidRequest("the prompt is empty", "prompt_ids")
        check_token_ids("prompt_ids", request.prompt_ids, self.vocab_size)
        if self.runner.arch.vision:
            check_images(self.hf_config, request.prompt_ids, request.images)
        elif request.images is not None:
            raise InvalidRequest(
                f"the base ({self.runner.arch.name}) reads text only: images are not accepted", "images"
            )
        check_token_ids("stop_token_ids", params.stop_token_ids, self.vocab_size)
        check_token_ids("logit_bias", [token for token, _bias in params.logit_bias], self.vocab_size)
        if params.max_tokens < 0:
            raise InvalidRequest(f"max_tokens must be >= 0, got {params.max_tokens}", "max_tokens")
        check_min_tokens(params.guided, params.min_tokens)
        for name, count in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if count is not None and not 0 <= count <= self.vocab_size:
                raise InvalidRequest(f"{name} must be in 0..{self.vocab_size}, got {count}", name)
        check_context(prompt_len, params.max_tokens, self.max_model_len)

    def _enqueue(self, request: Request, guide: GuidedMatcher | None = None) -> RequestStream:
        with self._lock:
            if self._snapshot.waiting + len(self._incoming) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
            state = SequenceState.create(request.params, request.prompt_ids)
            state.guide = guide
            seq = _Sequence(
                request=request,
                pool_id=f"{request.request_id}#{next(self._pool_ids)}",
                identity=_prefix_identity(request),
                output_ids=state.output_ids,
                state=state,
                loop=asyncio.get_running_loop(),
                queue=queue,
            )
            self._incoming.append(seq)
        self._wakeup.set()
        return RequestStream(request.request_id, queue)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)
        self._wakeup.set()

    def dead_reason(self) -> str | None:
        """Never dead: a failing step fails its requests, never the thread (``_loop``), which runs
        until ``stop``."""
        return None

    def stats(self) -> EngineStats:
        """The engine thread's last published snapshot, with requests not yet taken counted waiting."""
        with self._lock:
            snapshot, incoming = self._snapshot, len(self._incoming)
        return dataclasses.replace(snapshot, waiting=snapshot.waiting + incoming) if incoming else snapshot

    def check_kv(self, timeout_s: float = 10.0) -> None:
        """The leak check (the soak's and the tests'): waits up to ``timeout_s`` for the engine to be
        idle, then raises BlockAccountingError if it went idle with KV blocks still in use (the pool's
        full accounting in the message), RuntimeError if it never went idle."""
        deadline = time.monotonic() + timeout_s
        while not (stats := self.stats()).idle:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine is not idle after {timeout_s} s: {stats}")
            time.sleep(0.01)
        if stats.kv_books_error is not None:
            raise BlockAccountingError(stats.kv_books_error)

    @property
    def idle(self) -> bool:
        """Nothing waiting or running as of the last published step, and nothing submitted since."""
        return self.stats().idle

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting new requests and wait (up to timeout_s: --drain-timeout) for in-flight ones."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self._stopped.set()
        self._wakeup.set()
        if self._thread is not None:
            # A profiled engine writes its op table as its thread ends; summarising a long run's trace
            # takes minutes on a busy CPU, and that table is what --torch-profile-dir was asked for.
            profiling = self.engine_config.torch_profile_dir is not None
            self._thread.join(timeout=None if profiling else 30)
        if self._grammar_thread is not None:
            self._grammar_thread.shutdown(wait=False)

    # -- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        with self._profiled():
            self._loop()

    @contextlib.contextmanager
    def _profiled(self) -> Iterator[None]:
        """With ``torch_profile_dir`` set, profile the engine thread (the profiler sees only the thread
        it runs on) and write its op table there when the engine stops."""
        out = self.engine_config.torch_profile_dir
        if out is None:
            yield
            return
        # CPU activity only: the op table is self CPU time, which on a GPU is the launch work that
        # bounds a small model's step, and CUDA tracing (CUPTI) must start on the thread that first
        # used it; the engine thread is rarely that one (bench.naive hung on an H100 with it).
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            yield
        out.mkdir(parents=True, exist_ok=True)
        averages = profiler.key_averages()
        (out / "engine_ops.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=40))
        rows = [{"op": e.key, "calls": e.count, "self_cpu_us": e.self_cpu_time_total} for e in averages]
        # Written last and renamed into place: its presence means the profile is complete.
        (out / "engine_ops.json.tmp").write_text(json.dumps(rows))
        (out / "engine_ops.json.tmp").replace(out / "engine_ops.json")
        log.info("engine profile written to %s", out)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            if not self._has_work():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                self._step()
            except Exception as exc:
                # Rows fail alone inside the step (see _run_pass, _sample_and_accept);
                # this is the last resort for a bug in the scheduling itself, which must fail the
                # running requests and never kill the engine thread.
                log.exception("engine step failed")
                for seq in self.scheduler.retire_all():
                    self._emit_finish(seq, "abort", error=f"{type(exc).__name__}: {exc}")
            self._publish(self.scheduler.stats())

    def _publish(self, stats: EngineStats) -> None:
        """Hand the step's snapshot to other threads and to the metrics."""
        self._set_snapshot(stats)
        if stats.kv_books_error is not None:  # also visible as used blocks in the kv_cache_blocks gauge
            log.error("KV blocks leaked: %s", stats.kv_books_error)
        if self.metrics is not None:
            self.metrics.log_engine_stats(stats)

    def _set_snapshot(self, stats: EngineStats) -> None:
        with self._lock:
            self._snapshot = stats

    def _has_work(self) -> bool:
        return bool(self.scheduler.has_work or self._incoming or self._aborts)

    def _step(self) -> None:
        self._take_incoming()
        planned = self.scheduler.schedule()
        if self.scheduler.step_admissions:
            # Before any event of this step goes out: a client that heard from its request must not
            # still see it waiting (the queue bound counts waiting requests).
            self._set_snapshot(self.scheduler.stats())
        if planned:
            self._run_pass(planned)

    def _take_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, collections.deque()
            aborts, self._aborts = self._aborts, set()
            for seq in incoming:
                self.scheduler.add(seq)
            if incoming:
                # Until this step publishes, idle and the queue bound must still count them.
                self._snapshot = dataclasses.replace(self._snapshot, waiting=len(self.scheduler.waiting))
        if aborts:
            for seq in self.scheduler.abort(aborts):
                self._emit_finish(seq, "abort")

    def _run_pass(self, planned: list[PlannedRow[_Sequence]]) -> None:
        """One forward pass over the planned rows; if it fails, each half again, down to the failing
        rows. Retrying is safe: a row rewrites the same K/V at the same positions, and nothing is
        marked computed before a pass returns."""
        samplers = [row.seq for row in planned if row.samples]
        masks = self._fill_masks([seq for seq in samplers if seq.request.params.max_tokens])
        try:
            outputs = self.runner.forward([self._pass_row(row) for row in planned])
        except Exception as exc:
            _settle(masks)  # the retry fills again; never two fills of one matcher at once
            if len(planned) == 1:
                seq = planned[0].seq
                self._fail(seq, "decode" if seq.output_ids else "prefill", exc)
                return
            log.warning("forward pass over %d rows failed (%r); retrying in halves", len(planned), exc)
            half = len(planned) // 2
            self._run_pass(planned[:half])
            self._run_pass(planned[half:])
            return
        self._take_outputs(planned, outputs, masks)

    def _take_outputs(
        self,
        planned: list[PlannedRow[_Sequence]],
        outputs: list[torch.Tensor | None],
        masks: Future[None] | None,
    ) -> None:
        """Record what the pass computed, score prompts, then sample every row that is due a token."""
        sampling: list[tuple[_Sequence, torch.Tensor]] = []
        for row, logits in zip(planned, outputs, strict=True):
            seq = row.seq
            self.scheduler.computed(row)
            try:
                self._score_prompt(seq, row, logits)
            except Exception as exc:
                self._fail(seq, "prompt logprobs", exc)
                continue
            if not row.samples:
                continue
            if seq.request.params.max_tokens == 0:  # scoring only: the prompt's logprobs, no token
                self._finish(seq, "length")
            else:
                assert logits is not None
                sampling.append((seq, logits[-1:]))
        if not sampling:
            _settle(masks)
            return
        rows = [seq for seq, _ in sampling]
        self._sample_and_accept(rows, torch.cat([logits for _, logits in sampling]), masks)
        for seq in rows:
            if not seq.finished and seq.table is not None:  # None: preempted for an earlier row
                for victim in self.scheduler.make_room(seq):
                    log.info("preempted request %s (KV pool full)", victim.request.request_id)

    def _score_prompt(self, seq: _Sequence, row: PlannedRow[_Sequence], logits: torch.Tensor | None) -> None:
        """Prompt logprobs for the prompt positions this row computed (position i scores token i + 1)."""
        top = seq.request.params.prompt_logprobs
        if not seq.scoring or top is None or logits is None:
            return
        assert seq.prompt_logprobs is not None
        prompt = seq.request.prompt_ids
        targets = prompt[row.start + 1 : min(row.start + len(row.ids) + 1, len(prompt))]
        seq.prompt_logprobs.extend(score_tokens(logits, targets, top))

    def _fill_masks(self, rows: list[_Sequence]) -> Future[None] | None:
        """Start filling the constrained rows' token masks on the grammar thread, so the grammar work
        overlaps the forward pass (torch releases the GIL in its ops); None without such rows."""
        guides = [s.state.guide for s in rows if s.state.guide is not None]
        if not guides:
            return None
        if self._grammar_thread is None:
            self._grammar_thread = ThreadPoolExecutor(1, thread_name_prefix="lorayard-grammar")

        def fill() -> None:
            for guide in guides:
                guide.fill()  # keeps its own error, raised when its row samples

        return self._grammar_thread.submit(fill)

    def _sample_and_accept(
        self, rows: list[_Sequence], logits: torch.Tensor, masks: Future[None] | None = None
    ) -> None:
        """logits: [len(rows), vocab]; masks: the constrained rows' mask fill, awaited first. A row
        whose sampling or acceptance raises fails alone."""
        _settle(masks)
        greedy = greedy_tokens(logits, [s.state for s in rows])
        for i, seq in enumerate(rows):
            try:
                token = greedy[i] or sample_row(logits[i], seq.state, self.eos_token_ids)
                self._accept(seq, token)
            except Exception as exc:
                self._fail(seq, "sampling", exc)

    def _accept(self, seq: _Sequence, token: SampledToken) -> None:
        """Record a sampled token, send it, and retire the row if it finished."""
        state = seq.state
        params = state.params
        if state.guide is not None:
            state.guide.accept(token.token_id)  # raises if the grammar refuses it: this row fails
        state.output_ids.append(token.token_id)
        n = len(state.output_ids)
        finish: FinishReason | None = None
        is_stop = token.token_id in params.stop_token_ids or (
            token.token_id in self.eos_token_ids and not params.ignore_eos
        )
        if state.guide is not None and state.guide.terminated:
            finish = "stop"  # the document is complete (and its end-of-turn token accepted, if any)
        elif is_stop and n >= params.min_tokens:
            finish = "stop"
        elif n >= params.max_tokens or len(seq.request.prompt_ids) + n >= self.max_model_len:
            finish = "length"
        if finish is not None:
            self.scheduler.retire(seq)  # its blocks are back before its stream hears it finished
        self._emit(
            seq,
            TokenEvent(
                token.token_id,
                logprob=token.logprob,
                top_logprobs=token.top_logprobs,
                finish_reason=finish,
                prompt_tokens=len(seq.request.prompt_ids),
                output_tokens=n,
                prompt_logprobs=self._prompt_logprobs(seq) if n == 1 else None,
                cached_tokens=seq.cached_tokens,
            ),
        )

    def _fail(self, seq: _Sequence, stage: str, exc: Exception) -> None:
        """Finish one request with an error event (the API answers 500) and free its blocks."""
        log.error("request %s failed in %s", seq.request.request_id, stage, exc_info=exc)
        if not seq.finished:
            self._finish(seq, "abort", error=f"{stage} failed: {type(exc).__name__}: {exc}")

    def _finish(self, seq: _Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Retire a request, then send its final event."""
        self.scheduler.retire(seq)
        self._emit_finish(seq, reason, error)

    def _emit_finish(self, seq: _Sequence, reason: FinishReason, error: str | None = None) -> None:
        """The final event of a request the scheduler has already retired."""
        self._emit(
            seq,
            TokenEvent(
                None,
                finish_reason=reason,
                prompt_tokens=len(seq.request.prompt_ids),
                output_tokens=len(seq.state.output_ids),
                error=error,
                prompt_logprobs=self._prompt_logprobs(seq) if not seq.state.output_ids else None,
                cached_tokens=seq.cached_tokens,
            ),
        )

    @staticmethod
    def _prompt_logprobs(seq: _Sequence) -> tuple[PromptLogprob | None, ...] | None:
        """For the request's first event: complete once its prefill is (None on an early abort)."""
        if seq.prompt_logprobs is None or seq.scoring:
            return None
        return tuple(seq.prompt_logprobs)

    def _pass_row(self, row: PlannedRow[_Sequence]) -> PassRow:
        """The model runner's view of a planned row: its tokens, positions, blocks and adapter, and for
        a request with images their embeddings and M-RoPE positions (the vision tower runs here, on
        the engine thread, at most once per request and only when the row computes an image-pad
        token, i.e. not all of them came from the prefix cache: inside the pass's try, so a failure
        is that row's)."""
        seq = row.seq
        assert seq.table is not None
        images = seq.request.images
        if images is None:
            return PassRow(row.ids, row.start, seq.table.blocks, seq.adapter_slot, row.logits)
        if seq.vision is None:
            seq.vision = rope_prompt(self.model, seq.request.prompt_ids, images)
        n = len(row.ids)
        if seq.vision.features is None and seq.vision.has_pads(row.start, n):
            seq.vision.features = encode_images(self.model, images)
            if self.metrics is not None:
                self.metrics.vision_encoded_images.inc(len(images.grid_thw))
        return PassRow(
            row.ids,
            row.start,
            seq.table.blocks,
            seq.adapter_slot,
            row.logits,
            mrope=seq.vision.mrope(row.start, n),
            image_embeds=seq.vision.embeds_for(row.start, n),
        )

    @staticmethod
    def _emit(seq: _Sequence, event: TokenEvent) -> None:
        # A closed event loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            seq.loop.call_soon_threadsafe(seq.queue.put_nowait, event)


def _prefix_identity(request: Request) -> str | None:
    """The prefix-cache key's identity: the adapter version's, and with images the images' hashes too,
    so a cached block is shared only by requests with the same adapter and the same images (in order):
    a different image never hits, the same image hits."""
    identity = adapter_identity(request.adapter)
    if request.images is None:
        return identity
    return f"{identity or ''}|images:{','.join(request.images.hashes)}"


def _settle(masks: Future[None] | None) -> None:
    """Wait for a mask fill (its errors stay with each matcher, see GuidedMatcher.fill)."""
    if masks is not None:
        with contextlib.suppress(Exception):
            masks.result()
