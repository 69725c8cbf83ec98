"""EngineConfig: how an engine is sized and run, carried from the server's settings into the engine.

Built by ``Settings.engine_config()``: the Settings fields hold every default and every bound, so none is
repeated here (tests and benchmarks build one the same way, ``Settings(max_batch_size=2).engine_config()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorayard.base_model import Quantization


@dataclass(frozen=True)
class EngineConfig:
    device: str | None
    """cpu | cuda | cuda:N; None: cuda when available."""
    quantization: Quantization
    """Load the base 4bit or 8bit via bitsandbytes; None: plain weights."""
    max_batch_size: int
    """Running requests at most: the KV-cache slots wanted (fewer if the KV budget does not hold them)."""
    max_queue: int
    """Waiting requests at most; ``submit`` raises QueueFull past it."""
    max_model_len: int
    """Context window, prompt + max_tokens (capped at the base's max_position_embeddings)."""
    kv_cache_memory_gb: float | None
    """KV-cache budget; None: 4 GB on the CPU, 80% of free memory on a GPU."""
    prefill_chunk: int
    """Prompt tokens prefilled per engine iteration: bounds how long running streams wait."""
    torch_profile_dir: Path | None
    """Profile the engine thread with torch.profiler and write its op table here when it stops."""
