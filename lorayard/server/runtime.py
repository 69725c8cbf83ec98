"""What a running server holds: settings, metrics, and (once loaded) tokenizer, engine and registry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lorayard.architectures import UnsupportedArchitecture
from lorayard.base_model import BaseModelError, load_tokenizer, resolve_base_model
from lorayard.chat_format import stop_token_ids
from lorayard.server.adapters.registry import AdapterRegistry
from lorayard.server.engine.engine import Engine
from lorayard.server.engine.guided import GuidedCompiler
from lorayard.server.engine.types import ServingEngine
from lorayard.server.metrics import ServerMetrics
from lorayard.server.settings import Settings
from lorayard.vision import load_image_processor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lorayard.base_model import ResolvedBaseModel

log = logging.getLogger("lorayard.server")


class EngineUnavailable(Exception):
    """The engine --engine names cannot run here (vLLM not installed, a flag it cannot honour)."""


@dataclass
class Runtime:
    settings: Settings
    metrics: ServerMetrics = field(default_factory=ServerMetrics.create)
    started_at: float = field(default_factory=time.time)
    tokenizer: PreTrainedTokenizerBase | None = None
    image_processor: Any = None
    """A vision-language base's image processor (``lorayard.vision``); None: the base reads text only."""
    engine: ServingEngine | None = None
    registry: AdapterRegistry | None = None
    load_error: str | None = None
    draining: bool = False
    in_flight: int = 0
    """Generation requests admitted and not finished, wherever they are (compiling a grammar, loading
    an adapter, in the engine, streaming): a drain waits for them all. Event-loop only."""
    on_load_failed: Callable[[str], None] | None = None
    """Called with the reason when the base cannot be loaded: ``python -m lorayard.server`` exits non-zero
    then, so no orchestrator keeps a server that will never be ready."""

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.registry is not None and self.load_error is None

    async def load(self) -> None:
        """Load the base model off the event loop (so /health answers meanwhile), then start serving."""
        settings = self.settings
        started = time.perf_counter()
        try:
            base = await asyncio.to_thread(resolve_base_model, settings.base_model)
            tokenizer = await asyncio.to_thread(load_tokenizer, base)
            eos_token_ids = stop_token_ids(tokenizer)
            engine = await asyncio.to_thread(self._build_engine, base, eos_token_ids)
            await self._probe_vllm(engine, base)
            # Structured output needs the tokenizer's byte strings, for the width of the model's logits.
            engine.guided = await asyncio.to_thread(
                GuidedCompiler,
                tokenizer,
                engine.vocab_size,
                eos_token_ids,
                settings.grammar_compile_threads,
                lambda outcome: self.metrics.grammar_compiles.labels(outcome=outcome).inc(),
            )
            fingerprint = await asyncio.to_thread(lambda: base.fingerprint)
            if isinstance(engine, Engine) and engine.runner.arch.vision:  # --engine vllm: text only
                self.image_processor = await asyncio.to_thread(load_image_processor, base.path)
        except (UnsupportedArchitecture, BaseModelError, EngineUnavailable) as exc:  # expected: one line
            self._load_failed(f"cannot serve base model {settings.base_model!r}: {exc}")
            return
        except Exception as exc:
            log.exception("loading the base model failed")
            self._load_failed(f"loading the base model failed: {type(exc).__name__}: {exc}")
            return
        engine.start()
        registry = AdapterRegistry(
            settings.adapters_dir,
            engine,
            base_fingerprint=fingerprint,
            max_loaded=settings.max_loaded_adapters,
            poll_interval_s=settings.poll_interval,
            metrics=self.metrics,
            cache_dir=settings.adapter_cache_dir,
            cache_max_bytes=int(settings.adapter_cache_gb * 2**30),
        )
        await registry.start()
        self.tokenizer, self.engine, self.registry = tokenizer, engine, registry
        log.info(
            "ready: base %s on %s (engine %s) in %.1f s, %d KV blocks, adapters from %s",
            settings.base_model,
            engine.device,
            settings.engine,
            time.perf_counter() - started,
            engine.stats().kv_blocks_total,
            settings.adapters_dir,
        )

    def _build_engine(self, base: ResolvedBaseModel, eos_token_ids: set[int]) -> ServingEngine:
        """The engine --engine names, over ``base`` (blocking: run it off the event loop)."""
        if self.settings.engine == "native":
            return Engine.from_base(
                base, self.settings.engine_config(), eos_token_ids=eos_token_ids, metrics=self.metrics
            )
        try:
            from lorayard.server.engine_vllm.engine import VllmEngine
        except ImportError as exc:
            raise EngineUnavailable(
                f"--engine vllm needs vLLM in this Python ({exc}): run the server from the venv "
                "`make install-vllm` builds (.venv-vllm/bin/python -m lorayard.server ...)"
            ) from exc
        from lorayard.server.engine_vllm.config import VllmSettingsError

        try:
            engine = VllmEngine.from_base(
                base, self.settings, eos_token_ids=eos_token_ids, metrics=self.metrics
            )
        except VllmSettingsError as exc:
            raise EngineUnavailable(str(exc)) from exc
        engine.on_dead = self._engine_died
        return engine

    async def _probe_vllm(self, engine: ServingEngine, base: ResolvedBaseModel) -> None:
        """--engine vllm: its startup parity probe (the native engine ran its own in from_base); a
        miss stops vLLM before the failure is reported."""
        if self.settings.engine != "vllm":
            return
        from lorayard.server.engine_vllm.engine import VllmEngine

        assert isinstance(engine, VllmEngine)
        try:
            await engine.probe_parity(base, self.settings.parity_probe)
        except BaseException:
            engine.stop()
            raise

    def check_engine(self) -> None:
        """Ask a loaded engine whether it died with no request to notice it (vLLM's process killed):
        /ready and /metrics call this, so the replica stops being ready and the server exits."""
        if self.engine is None or self.load_error is not None:
            return
        reason = self.engine.dead_reason()
        if reason is not None:
            self._engine_died(reason)

    def _engine_died(self, reason: str) -> None:
        """The engine cannot serve any more (vLLM's process died): not ready, and the server exits
        non-zero (as when the base fails to load), so it is restarted rather than kept."""
        self._load_failed(reason)

    def _load_failed(self, reason: str) -> None:
        self.load_error = reason
        log.error("%s", reason)
        if self.on_load_failed is not None:
            self.on_load_failed(reason)

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """One generation request in flight for the body of the ``with``."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def drain(self) -> None:
        """SIGTERM: refuse new work (503), let every admitted request and stream finish (up to
        --drain-timeout), those not yet in the engine too."""
        self.draining = True
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine is not None:
            await self.engine.drain(max(0.0, deadline - time.monotonic()))

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.stop()
        if self.engine is not None:
            self.engine.stop()
            if self.engine.guided is not None:
                self.engine.guided.close()


class ReadyRuntime(Protocol):
    """A :class:`Runtime` whose base model has loaded: what the routes behind the readiness check see."""

    settings: Settings
    metrics: ServerMetrics
    started_at: float
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any
    engine: ServingEngine
    registry: AdapterRegistry

    def admitted(self) -> contextlib.AbstractContextManager[None]: ...
