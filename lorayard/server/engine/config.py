"""EngineConfig: how an engine is sized and run, carried from the server's settings into the engine.

Built by ``Settings.engine_config()``: the Settings fields hold every default and every bound, so none is
repeated here (tests and benchmarks build one the same way, ``Settings(max_batch_size=2).engine_config()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lorayard.base_model import Quantization, default_dtype

if TYPE_CHECKING:
    import torch

    from lorayard.server.engine.decode_graphs import Mode

DecodeMode = Literal["auto", "eager", "static", "graph"]
"""``--decode-mode``: how a pass of decode rows only runs (docs/gpu.md)."""
WeightDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""``--dtype``: the base's (adapters', KV cache's) dtype; auto: :func:`lorayard.base_model.default_dtype`."""

CPU_MAX_BATCH_SIZE = 16
"""On the CPU a step is compute-bound: past about 16 rows a bigger batch only stretches every stream's
inter-token latency (bench/multi_adapter.py)."""
GPU_MAX_BATCH_SIZE = 256
"""vLLM's default: a small model on a GPU is launch- and bandwidth-bound far beyond 16 rows, so the
KV pool, not this limit, should decide how many requests run."""


def default_max_batch_size(device: str) -> int:
    return GPU_MAX_BATCH_SIZE if device.startswith("cuda") else CPU_MAX_BATCH_SIZE


def weight_dtype(dtype: WeightDtype, device: str) -> torch.dtype:
    """``--dtype`` as a torch dtype; auto: float32 on the CPU, bf16 (fp16 without it) on a GPU."""
    import torch  # not at import: the settings (and the CLI) import this module without torch

    return default_dtype(device) if dtype == "auto" else getattr(torch, dtype)


def resolve_decode_mode(mode: DecodeMode, device: str, quantization: Quantization) -> Mode:
    """``auto``: eager, on every device, until a GPU run has validated graph replay (issue 16's GPU
    run; then auto becomes graph on CUDA over an unquantized base). On the CPU the eager step with
    the segment LoRA path measured faster than the static one (docs/gpu.md); on a GPU an untested
    capture must not be what a deployment gets by default. ``graph`` off CUDA is refused, naming the
    flag; ``graph`` over a 4/8-bit base is allowed but unproven (bitsandbytes' layers in a graph)."""
    if mode == "auto":
        return "eager"
    if mode == "graph" and not device.startswith("cuda"):
        raise ValueError(f"--decode-mode graph needs a CUDA device, the engine runs on {device}")
    del quantization  # part of the rule once graph is auto's choice on CUDA (above)
    return mode


@dataclass(frozen=True)
class EngineConfig:
    device: str | None
    """cpu | cuda | cuda:N; None: cuda when available."""
    quantization: Quantization
    """Load the base 4bit or 8bit via bitsandbytes; None: plain weights."""
    max_batch_size: int | None
    """Running requests at most (fewer while the KV pool cannot hold more); None:
    :func:`default_max_batch_size` for the device."""
    max_queue: int
    """Waiting requests at most; ``submit`` raises QueueFull past it."""
    max_model_len: int
    """Context window, prompt + max_tokens (capped at the base's max_position_embeddings)."""
    kv_cache_memory_gb: float | None
    """KV-cache budget; None: 4 GB on the CPU, 80% of free memory on a GPU."""
    prefix_caching: bool
    """Share computed KV blocks between requests with the same prefix under the same weights."""
    prefill_chunk: int
    """Prompt tokens prefilled per engine iteration: bounds how long running streams wait."""
    torch_profile_dir: Path | None
    """Profile the engine thread with torch.profiler and write its op table here when it stops."""
    decode_mode: DecodeMode
    """How a pass of decode rows only runs: eager (the packed pass, segment LoRA), static (padded to a
    batch bucket over fixed buffers with stacked LoRA, run eagerly), graph (static, replayed as one
    CUDA graph per bucket); auto: :func:`resolve_decode_mode`."""
    max_loaded_adapters: int
    """Adapter versions resident at once: the stacked LoRA's rows (static and graph decode)."""
    idle_prefill_chunk: int = 2048
    """Prompt tokens of a pass in which no request decodes (at least ``prefill_chunk``): no stream waits
    on it, and one pass over a whole prompt beats several chunks (vLLM's CPU server: 2048 a step)."""
    dtype: WeightDtype = "auto"
    """The weights' dtype: auto is float32 on the CPU (token-identical to HF/PEFT in float32) and bf16
    (fp16 without bf16) on a GPU; bfloat16 on the CPU is faster at every pass shape on a CPU with
    bf16 matmul units (AMX or AVX512-BF16; its linears run over prepacked weights, docs/performance.md)
    and is checked against HF in bf16, not float32: not token-identical to a float32 run."""
