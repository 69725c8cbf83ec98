"""Our server settings -> vLLM's engine arguments (``vllm.AsyncEngineArgs``), without importing vLLM.

What has a meaning in both engines is passed on (context window, batch bound, prefix caching, the
KV budget, adapters resident and per batch); what only vLLM has is ours to pass through
(parallelism, its executor, the largest LoRA rank). Our own engine's tuning (``--decode-mode``,
``--prefill-chunk``, ``--torch-profile-dir``) has no vLLM meaning and is refused by name when set.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorayard.server.engine.config import default_max_batch_size
from lorayard.server.engine_vllm.sampling import MAX_LOGPROBS

if TYPE_CHECKING:
    from lorayard.server.settings import Settings

NATIVE_ONLY_FIELDS = (
    "decode_mode",
    "prefill_chunk",
    "idle_prefill_chunk",
    "torch_profile_dir",
    "quantization",
)
"""Settings of our engine alone: set with --engine vllm, they are refused (vLLM has its own)."""


class VllmSettingsError(ValueError):
    """A setting that --engine vllm cannot honour (the message names its flag)."""


def refuse_native_only(settings: Settings) -> None:
    """Raise VllmSettingsError naming every native-only flag set away from its default."""
    from lorayard.flags import flag_name

    fields = type(settings).model_fields
    given = [
        flag_name(name)
        for name in NATIVE_ONLY_FIELDS
        if getattr(settings, name) != fields[name].get_default(call_default_factory=True)
    ]
    if given:
        raise VllmSettingsError(f"{', '.join(given)}: our engine's alone, not available with --engine vllm")


def engine_arguments(
    settings: Settings, base: Path, device: str, dtype: str, max_model_len: int
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.AsyncEngineArgs`` for serving ``base`` under ``settings``."""
    refuse_native_only(settings)
    kwargs: dict[str, Any] = {
        "model": str(base),
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": settings.max_batch_size or default_max_batch_size(device),
        "enable_prefix_caching": settings.prefix_caching,
        "enable_lora": True,
        "max_cpu_loras": settings.max_loaded_adapters,
        "max_loras": min(settings.max_loras or settings.max_loaded_adapters, settings.max_loaded_adapters),
        "max_lora_rank": settings.max_lora_rank,
        "max_logprobs": MAX_LOGPROBS,
        "logprobs_mode": "processed_logprobs",
        "tensor_parallel_size": settings.tensor_parallel_size,
        "pipeline_parallel_size": settings.pipeline_parallel_size,
        "data_parallel_size": settings.data_parallel_size,
        # Sampling defaults come from the request (our API), never from the model's generation_config.
        "generation_config": "vllm",
        "disable_log_stats": False,  # its per-step stats feed our gauges
    }
    if settings.distributed_executor_backend is not None:
        kwargs["distributed_executor_backend"] = settings.distributed_executor_backend
    if settings.kv_cache_memory_gb is not None and device.startswith("cuda"):
        kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_memory_gb * 2**30)
    return kwargs


def cpu_environment(settings: Settings) -> dict[str, str]:
    """vLLM's CPU build sizes its KV cache from the environment (GiB): our budget, 4 GiB by default."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(settings.kv_cache_memory_gb or 4)))}
