"""``--engine vllm``: vLLM's AsyncLLM in-process, behind the same engine surface as ours.

The API layer, the registry, the volume watcher, the lifecycle and the metrics are unchanged in
front (they use :class:`lorayard.server.engine.types.ServingEngine`). What differs is behind
``submit``:

- each adapter *version* the registry loads becomes one ``LoRARequest`` with an id never reused
  (``lora_int_id``) and the name ``<name@vN>#<id>``: vLLM keys its prefix cache and LoRA slots by
  them, so a version replaced in place on the volume (a new load, a new id) can never be served
  another version's cached KV. The registry's eviction removes it from vLLM (``remove_lora``);
  ``--max-loaded-adapters`` is vLLM's ``max_cpu_loras``, ``--max-loras`` its per-batch slots.
- each request is one vLLM request (``n`` 1: the API submits each choice on its own), its params
  mapped by :mod:`lorayard.server.engine_vllm.sampling`, its outputs turned into our events by
  :mod:`lorayard.server.engine_vllm.outputs`. Stop strings, detokenization and usage stay the API's.
- ``abort`` cancels the request's task, which aborts it in vLLM; ``drain`` refuses new requests and
  waits for the running ones; vLLM's per-step scheduler stats become our :class:`EngineStats`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import vllm
from transformers import AutoConfig
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from lorayard.server.engine.engine import RequestStream
from lorayard.server.engine.parity_probe import probe_tokens
from lorayard.server.engine.request_rules import check_context, check_min_tokens, check_token_ids
from lorayard.server.engine.types import (
    EngineStats,
    EngineStopped,
    InvalidRequest,
    QueueFull,
    Request,
    TokenEvent,
)
from lorayard.server.engine_vllm.config import VllmSettingsError, cpu_environment, engine_arguments
from lorayard.server.engine_vllm.outputs import OutputTracker
from lorayard.server.engine_vllm.parity_probe import (
    DECODE_STEPS,
    PROBE_TOP,
    ProbeMode,
    ProbeObservation,
    ProbeResult,
    check_parity,
    skip_reason,
)
from lorayard.server.engine_vllm.sampling import sampling_kwargs

if TYPE_CHECKING:
    from lorayard.adapter_files import AdapterWeights
    from lorayard.base_model import ResolvedBaseModel
    from lorayard.server.engine.guided import GuidedCompiler
    from lorayard.server.metrics import ServerMetrics
    from lorayard.server.settings import Settings

log = logging.getLogger("lorayard.engine_vllm")

VLLM_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
"""The linears vLLM applies LoRA to in the decoder layers of the bases we serve; an adapter
targeting others (embeddings, lm_head) is refused at load, never served without them."""
ADD_LORA_TIMEOUT_S = 300.0


class VllmEngine:
    """See the module docstring; the surface is ``ServingEngine``'s."""

    def __init__(
        self,
        llm: AsyncLLM,
        settings: Settings,
        hf_config: Any,
        *,
        eos_token_ids: set[int],
        max_model_len: int,
        metrics: ServerMetrics | None,
    ) -> None:
        self.llm = llm
        self.hf_config = hf_config
        self.vocab_size = int(hf_config.vocab_size)
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_lora_rank = settings.max_lora_rank
        self.max_queue = settings.max_queue
        cache = llm.vllm_config.cache_config
        self.max_batch_size = int(llm.vllm_config.scheduler_config.max_num_seqs)
        self.device = str(llm.vllm_config.device_config.device)
        self.num_blocks = int(cache.num_gpu_blocks or 0)
        self.metrics = metrics
        self.guided: GuidedCompiler | None = None
        self.on_dead: Callable[[str], None] | None = None
        """Told once if vLLM's engine dies (its process gone): the runtime stops the server, so an
        orchestrator restarts it instead of keeping a replica that answers 500 forever."""
        self._lora_ids = itertools.count(1)  # vLLM's ids start at 1; never reused (see the docstring)
        self._loras: dict[int, LoRARequest] = {}
        self._names: dict[str, str] = {}
        """vLLM's lora_name -> our adapter name, for the per-adapter gauges."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._lock = threading.Lock()
        self._snapshot = EngineStats(running=0, waiting=0, batch_size=0, kv_cache_usage=0.0)
        if metrics is not None:
            metrics.log_engine_config(
                max_lora=settings.max_loaded_adapters,
                block_size=int(cache.block_size),
                num_blocks=self.num_blocks,
            )
            metrics.log_engine_stats(self._snapshot)

    @classmethod
    def from_base(
        cls,
        base: ResolvedBaseModel,
        settings: Settings,
        *,
        eos_token_ids: set[int],
        metrics: ServerMetrics | None = None,
    ) -> VllmEngine:
        """Start vLLM over ``base`` (blocking: minutes on a CPU; call it off the event loop)."""
        import torch

        from lorayard.server.engine.config import weight_dtype

        hf_config = AutoConfig.from_pretrained(base.path)
        device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        max_model_len = min(settings.max_model_len, int(getattr(hf_config, "max_position_embeddings", 10**9)))
        # --dtype means the same in both engines; auto: float32 on the CPU (not vLLM's own auto, bf16).
        dtype = str(weight_dtype(settings.dtype, device)).removeprefix("torch.")
        if device == "cpu":
            for key, value in cpu_environment(settings).items():
                os.environ.setdefault(key, value)
        args = vllm.AsyncEngineArgs(**engine_arguments(settings, base.path, device, dtype, max_model_len))
        holder: list[VllmEngine] = []
        try:
            llm = AsyncLLM.from_engine_args(args, stat_loggers=[_stats_logger_factory(holder)])
        except ValueError as exc:  # its config checks (pydantic's errors are ValueErrors): one line
            errors = getattr(exc, "errors", None)
            reason = errors()[0]["msg"] if callable(errors) else str(exc)
            raise VllmSettingsError(f"vLLM refuses these settings: {reason}") from exc
        engine = cls(
            llm,
            settings,
            hf_config,
            eos_token_ids=eos_token_ids,
            max_model_len=max_model_len,
            metrics=metrics,
        )
        holder.append(engine)
        return engine

    # -- the startup parity probe (event loop, before start) ------------------------------------------
    async def probe_parity(self, base: ResolvedBaseModel, mode: ProbeMode) -> ProbeResult | None:
        """The startup parity probe (:mod:`lorayard.server.engine_vllm.parity_probe`) through this
        engine; None when ``mode`` skips it. Raises UnsupportedArchitecture on a miss."""
        dtype = self.llm.vllm_config.model_config.dtype
        reason = await asyncio.to_thread(skip_reason, mode, base.path, dtype)
        if reason is not None:
            log.warning("parity probe against transformers skipped: %s", reason)
            return None
        observation = await self._probe_observation()
        architecture = str(getattr(self.hf_config, "model_type", "unknown"))
        result = await asyncio.to_thread(check_parity, observation, base, dtype, architecture)
        log.info(
            "parity probe: vLLM's logprobs equal transformers' on %s (%d positions, %d greedy steps; max "
            "difference %.3g of the largest logit, tolerance %g)",
            architecture,
            len(observation.logprobs),
            len(observation.generated),
            result.max_difference,
            result.tolerance,
        )
        return result

    async def _probe_observation(self) -> ProbeObservation:
        """The probe's tokens through vLLM: prompt logprobs, then greedy steps with their logprobs."""
        tokens = probe_tokens(self.vocab_size)
        params = vllm.SamplingParams(
            n=1,
            max_tokens=DECODE_STEPS,
            temperature=0.0,
            ignore_eos=True,
            logprobs=PROBE_TOP,
            prompt_logprobs=PROBE_TOP,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        prompt = TokensPrompt(prompt_token_ids=tokens)
        async for output in self.llm.generate(prompt, params, "lorayard-parity-probe"):
            final = output
        assert final is not None and final.prompt_logprobs is not None
        completion = final.outputs[0]
        entries = [*final.prompt_logprobs[1:], *(completion.logprobs or [])]
        return ProbeObservation(
            tokens,
            [int(token) for token in completion.token_ids],
            [{int(token): float(lp.logprob) for token, lp in entry.items()} for entry in entries],
        )

    # -- adapters (the registry's calls; load from a worker thread, free on the event loop) ----------
    def load_adapter_weights(self, key: str, weights: AdapterWeights, folder: Path | None = None) -> int:
        """Hand vLLM the version's folder under a new id; refuses what vLLM would serve differently."""
        if folder is None:
            raise ValueError(f"adapter {key}: --engine vllm loads adapters from their folder")
        self._check_servable(key, weights)
        assert self._loop is not None, "start() first"
        lora_id = next(self._lora_ids)
        lora = LoRARequest(lora_name=f"{key}#{lora_id}", lora_int_id=lora_id, lora_path=str(folder))
        future = asyncio.run_coroutine_threadsafe(self.llm.add_lora(lora), self._loop)
        try:
            future.result(ADD_LORA_TIMEOUT_S)
        except Exception as exc:
            raise ValueError(f"vLLM cannot load it: {exc}") from exc
        self._loras[lora_id] = lora
        self._names[lora.lora_name] = key.partition("@")[0]
        return lora_id

    def _check_servable(self, key: str, weights: AdapterWeights) -> None:
        if weights.uses_dora:
            raise ValueError("DoRA adapters are not served by --engine vllm (use the native engine)")
        if weights.max_rank > self.max_lora_rank:
            raise ValueError(f"rank {weights.max_rank} is above --max-lora-rank {self.max_lora_rank}")
        outside = sorted(set(weights.target_modules) - VLLM_LORA_MODULES)
        if outside:
            raise ValueError(f"--engine vllm applies LoRA to {sorted(VLLM_LORA_MODULES)}, not to {outside}")
        for field in ("rank_pattern", "alpha_pattern"):
            if weights.config.get(field):
                raise ValueError(f"{field} is not served by --engine vllm (use the native engine)")

    def free_adapter_weights(self, slot: int) -> None:
        lora = self._loras.pop(slot, None)
        if lora is None or self._loop is None:
            return
        self._names.pop(lora.lora_name, None)
        task = self._loop.create_task(self.llm.remove_lora(slot))
        task.add_done_callback(_log_failure(f"removing adapter {lora.lora_name} from vLLM"))

    # -- requests (event loop) ----------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def submit(self, request: Request) -> RequestStream:
        """Queue a request; raises InvalidRequest, PromptTooLong, QueueFull or EngineStopped."""
        if self._draining:
            raise EngineStopped("the server is shutting down")
        self._validate(request)
        try:
            kwargs = sampling_kwargs(request.params, self.eos_token_ids)
            structured = kwargs.pop("structured_outputs", None)
            params = vllm.SamplingParams(
                **kwargs,
                output_kind=RequestOutputKind.DELTA,
                structured_outputs=None if structured is None else StructuredOutputsParams(**structured),
            )
        except ValueError as exc:
            if isinstance(exc, InvalidRequest):
                raise
            raise InvalidRequest(str(exc)) from exc
        if len(self._tasks) >= self.max_batch_size + self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting")
        lora = None
        if request.adapter is not None:
            lora = self._loras.get(request.adapter.slot)
            if lora is None:
                raise InvalidRequest(f"adapter {request.adapter.key} is not loaded", "adapter")
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        tracker = OutputTracker(
            request.prompt_ids,
            request.params.logprobs,
            request.params.prompt_logprobs,
            request.params.max_tokens == 0,
        )
        task = asyncio.get_running_loop().create_task(self._run(request, params, lora, tracker, queue))
        self._tasks[request.request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request.request_id, None))
        return RequestStream(request.request_id, queue)

    def _validate(self, request: Request) -> None:
        """The same guard as our engine's: what the API already checked, checked again here."""
        params = request.params
        if not request.prompt_ids:
            raise InvalidRequest("the prompt is empty", "prompt_ids")
        if request.images is not None:  # the runtime loads no image processor for --engine vllm
            raise InvalidRequest("images are not served with --engine vllm", "images")
        check_token_ids("prompt_ids", request.prompt_ids, self.vocab_size)
        check_token_ids("stop_token_ids", params.stop_token_ids, self.vocab_size)
        check_token_ids("logit_bias", [token for token, _bias in params.logit_bias], self.vocab_size)
        if params.max_tokens < 0:
            raise InvalidRequest(f"max_tokens must be >= 0, got {params.max_tokens}", "max_tokens")
        check_min_tokens(params.guided, params.min_tokens)
        if params.guided is not None and self.guided is None:
            raise InvalidRequest("structured output is not available on this engine", "guided")
        check_context(len(request.prompt_ids), params.max_tokens, self.max_model_len)

    async def _run(
        self,
        request: Request,
        params: vllm.SamplingParams,
        lora: LoRARequest | None,
        tracker: OutputTracker,
        queue: asyncio.Queue[TokenEvent],
    ) -> None:
        finished = False
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_ids))
        try:
            async for output in self.llm.generate(prompt, params, request.request_id, lora_request=lora):
                for event in tracker.events(output):
                    finished = finished or event.finish_reason is not None
                    queue.put_nowait(event)
        except asyncio.CancelledError:
            pass  # aborted: vLLM's generate aborted the request on its way out
        except Exception as exc:
            log.error("request %s failed in vLLM", request.request_id, exc_info=exc)
            queue.put_nowait(self._final(tracker, error=f"vLLM failed: {type(exc).__name__}: {exc}"))
            if self.llm.errored and self.on_dead is not None:
                on_dead, self.on_dead = self.on_dead, None
                on_dead(f"vLLM's engine died: {type(exc).__name__}: {exc}")
            return
        if not finished:
            queue.put_nowait(self._final(tracker))

    @staticmethod
    def _final(tracker: OutputTracker, error: str | None = None) -> TokenEvent:
        return TokenEvent(
            None,
            finish_reason="abort",
            prompt_tokens=len(tracker.prompt_ids),
            output_tokens=tracker.output_tokens,
            error=error,
        )

    def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def dead_reason(self) -> str | None:
        """vLLM's errored flag: its own monitor sets it when the engine-core process dies, request or not."""
        return "vLLM's engine died (its engine-core process is gone)" if self.llm.errored else None

    def stats(self) -> EngineStats:
        with self._lock:
            return self._snapshot

    @property
    def idle(self) -> bool:
        return not self._tasks

    def record(self, stats: Any) -> None:
        """One vLLM scheduler step's stats (``SchedulerStats``) as ours, and into our gauges."""
        names = self._names

        def adapters(counts: dict[str, int]) -> tuple[str, ...]:
            return tuple(sorted({names.get(lora_name, lora_name) for lora_name, n in counts.items() if n}))

        snapshot = EngineStats(
            running=int(stats.num_running_reqs),
            waiting=int(stats.num_waiting_reqs),
            batch_size=int(stats.num_running_reqs),
            kv_cache_usage=float(stats.kv_cache_usage),
            kv_blocks_total=self.num_blocks,
            kv_blocks_used=round(float(stats.kv_cache_usage) * self.num_blocks),
            running_adapters=adapters(stats.running_lora_adapters),
            waiting_adapters=adapters(stats.waiting_lora_adapters),
        )
        with self._lock:
            self._snapshot = snapshot
        if self.metrics is not None:
            self.metrics.log_engine_stats(snapshot)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests and wait (up to ``timeout_s``) for the running ones."""
        self._draining = True
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    def stop(self) -> None:
        self._draining = True
        for task in list(self._tasks.values()):
            task.cancel()
        self.llm.shutdown()


def _stats_logger_factory(holder: list[VllmEngine]) -> Any:
    """vLLM builds its stat loggers before our engine exists: this one finds it in ``holder``."""

    class _Logger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            del vllm_config, engine_index

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            del iteration_stats, mm_cache_stats, engine_idx
            if scheduler_stats is not None and holder:
                holder[0].record(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _Logger


def _log_failure(what: str) -> Any:
    def check(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %r", what, task.exception())

    return check
