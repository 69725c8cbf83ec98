"""What a running server holds: settings, metrics, and (once loaded) tokenizer, engine and registry."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from lorayard.base_model import load_tokenizer, resolve_base_model
from lorayard.chat_format import stop_token_ids
from server.adapters.registry import AdapterRegistry
from server.api.errors import APIError
from server.engine.engine import Engine
from server.engine.guided import GuidedCompiler
from server.metrics import ServerMetrics
from server.settings import Settings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("lorayard.server")


@dataclass
class Runtime:
    settings: Settings
    metrics: ServerMetrics = field(default_factory=ServerMetrics.create)
    started_at: float = field(default_factory=time.time)
    tokenizer: PreTrainedTokenizerBase | None = None
    engine: Engine | None = None
    registry: AdapterRegistry | None = None
    load_error: str | None = None
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.registry is not None

    async def load(self) -> None:
        """Load the base model off the event loop (so /health answers meanwhile), then start serving."""
        settings = self.settings
        started = time.perf_counter()
        try:
            base = await asyncio.to_thread(resolve_base_model, settings.base_model)
            tokenizer = await asyncio.to_thread(load_tokenizer, base)
            eos_token_ids = stop_token_ids(tokenizer)
            engine = await asyncio.to_thread(
                Engine.from_base,
                base,
                device=settings.device,
                quantization=settings.quantization,
                eos_token_ids=eos_token_ids,
                max_batch_size=settings.max_batch_size,
                max_queue=settings.max_queue,
                max_model_len=settings.max_model_len,
                kv_cache_memory_gb=settings.kv_cache_memory_gb,
                prefill_chunk=settings.prefill_chunk,
                metrics=self.metrics,
            )
            # Structured output needs the tokenizer's byte strings, for the width of the model's logits.
            engine.guided = await asyncio.to_thread(
                GuidedCompiler, tokenizer, engine.vocab_size, eos_token_ids
            )
            fingerprint = await asyncio.to_thread(lambda: base.fingerprint)
        except Exception as exc:  # reported on /ready; the process stays up for inspection
            self.load_error = f"loading the base model failed: {type(exc).__name__}: {exc}"
            log.exception("loading the base model failed")
            return
        engine.start()
        registry = AdapterRegistry(
            settings.adapters_dir,
            engine,
            base_fingerprint=fingerprint,
            max_loaded=settings.max_loaded_adapters,
            poll_interval_s=settings.poll_interval,
            metrics=self.metrics,
        )
        await registry.start()
        self.tokenizer, self.engine, self.registry = tokenizer, engine, registry
        log.info(
            "ready: base %s on %s in %.1f s, %d KV slots, adapters from %s",
            settings.base_model,
            engine.device,
            time.perf_counter() - started,
            engine.max_batch_size,
            settings.adapters_dir,
        )

    async def drain(self) -> None:
        """SIGTERM: refuse new work (503), let in-flight requests and streams finish."""
        self.draining = True
        if self.engine is not None:
            await self.engine.drain(self.settings.drain_timeout)

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.stop()
        if self.engine is not None:
            self.engine.stop()


def require_api_key(request: Request) -> None:
    """Bearer key check in constant time; a no-op when no key is configured."""
    runtime: Runtime = request.app.state.runtime
    expected = runtime.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(
            401, "missing or invalid API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"
        )
