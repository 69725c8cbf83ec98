"""Server settings: one pydantic model; every field is a flag ``--x-y`` and an env var ``LORAYARD_X_Y``.

Precedence: flag > environment > the field's default (the one source of truth for each default).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorayard.base_model import Quantization, default_base_model
from lorayard.flags import add_field_flags, flag_name, flags_table
from lorayard.s3_storage import DEFAULT_CACHE_BYTES, default_cache_dir
from lorayard.server.engine.config import DecodeMode, EngineConfig, WeightDtype
from lorayard.storage import location_value
from lorayard.tool_format import ToolFormatName
from lorayard.vision import ImageLimits

ENV_PREFIX = "LORAYARD_"

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM can be sized for (its ``--max-lora-rank`` choices)."""
VLLM_ONLY_FIELDS = (
    "max_loras",
    "max_lora_rank",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel_size",
    "distributed_executor_backend",
    "parity_probe",
)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    adapters_dir: Path | str = Field(
        Path("adapters"), description="the adapters volume to serve from: a folder or s3://bucket/prefix"
    )
    adapter_cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="where versions downloaded from an object store are kept",
    )
    adapter_cache_gb: float = Field(
        DEFAULT_CACHE_BYTES / 2**30, gt=0, description="bound of that cache (least recently used go first)"
    )
    base_model: str = Field(default_factory=default_base_model, description="alias, local folder or hub id")
    quantization: Quantization = Field(
        None, description="load the base 4bit (NF4, double quant) or 8bit via bitsandbytes; LoRA on top"
    )
    device: str | None = Field(None, description="cpu | cuda | cuda:N (default: cuda if available)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    port_file: Path | None = Field(
        None,
        description="once listening, write the bound port here (with --port 0: a supervisor or test "
        "learns the port the OS chose, with no gap between choosing and binding it)",
    )
    api_key: str | None = Field(
        None, description="require 'Authorization: Bearer KEY' on every route but /health"
    )
    metrics_public: bool = Field(True, description="serve /metrics without the API key")
    max_batch_size: int | None = Field(
        None, ge=1, le=4096, description="running requests at most (default: 16 on the CPU, 256 on a GPU)"
    )
    max_loaded_adapters: int = Field(8, ge=1, description="adapter versions resident in memory at most")
    max_queue: int = Field(256, ge=1, description="waiting requests at most; past it: 429")
    max_model_len: int = Field(2048, ge=16, description="context window: prompt + max_tokens")
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(8, ge=1, description="largest n (choices per request)")
    tool_call_format: ToolFormatName | None = Field(
        None,
        description="how the base writes tool calls: hermes, llama3_json or mistral (default: recognised "
        "from its chat template; hermes for a template without tools support). Tool requests are refused "
        "where it contradicts the format the template writes, or the one an adapter version was trained "
        "in (its manifest's, which that version is otherwise served in)",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body size limit (413 past it)")
    responses_store_size: int = Field(
        1000, ge=0, description="stored /v1/responses (for previous_response_id) at most; the oldest go first"
    )
    responses_store_ttl: float = Field(
        3600.0, gt=0, description="seconds a stored /v1/responses response is kept (in memory, per API key)"
    )
    max_schema_bytes: int = Field(
        64 << 10,
        ge=256,
        description="a structured-output JSON schema's size limit, as compact JSON (400 past it): its "
        "grammar compiles in well under a second",
    )
    grammar_compile_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a schema's grammar may compile (400 past it; it is cached if it ends)",
    )
    grammar_compile_threads: int = Field(
        2, ge=1, description="grammar compiles at once, on their own threads (others wait their turn)"
    )
    max_image_bytes: int = Field(
        10 << 20, ge=1024, description="a vision-language base: one image's encoded size limit (400 past it)"
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=28 * 28,
        description="one image's width x height limit, read from its header before decoding (400 past it)",
    )
    max_images: int = Field(8, ge=1, description="images in one request at most (400 past it)")
    image_dir: Path | None = Field(
        None,
        description="also accept image URLs file:NAME for files inside this folder (default: data: URLs "
        "only; nothing is ever fetched from the network)",
    )
    kv_cache_memory_gb: float | None = Field(
        None, gt=0, description="KV-cache budget (default: 4 GB on the CPU, most of the free GPU memory)"
    )
    prefix_caching: bool = Field(
        True, description="reuse the KV of prompt prefixes already computed under the same adapter version"
    )
    prefill_chunk: int = Field(256, ge=1, description="prompt tokens prefilled per engine step")
    idle_prefill_chunk: int = Field(
        2048,
        ge=1,
        description="prompt tokens prefilled per step while no request decodes (at least --prefill-chunk)",
    )
    dtype: WeightDtype = Field(
        "auto",
        description="weights' dtype: auto (float32 on the CPU, exact; bf16 on a GPU) | float32 | bfloat16 "
        "(faster on a CPU with AMX/AVX512-BF16, batch 1 included; not token-identical to float32) | float16",
    )
    torch_profile_dir: Path | None = Field(
        None,
        description="profile the engine thread (torch.profiler); its op table is written here on stop "
        "(the profiler keeps every op event in memory until then: profile short runs)",
    )
    decode_mode: DecodeMode = Field(
        "auto",
        description="decode steps: eager | static (padded to a batch bucket, stacked LoRA) | graph "
        "(static, replayed as CUDA graphs) | auto (eager until graph replay is validated on a GPU)",
    )
    poll_interval: float = Field(
        1.0, gt=0, description="seconds between adapters-volume scans (LATEST, canary splits, new adapters)"
    )
    drain_timeout: float = Field(60.0, ge=0, description="seconds SIGTERM waits for in-flight requests")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    engine: Literal["native", "vllm"] = Field(
        "native",
        description="what runs the model: native (ours) | vllm (vLLM's engine in-process, from the "
        "vllm extra's own venv: make install-vllm; docs/deploy.md says when)",
    )
    max_loras: int | None = Field(
        None,
        ge=1,
        description="--engine vllm: adapter versions in one batch (vLLM's --max-loras; default: "
        "--max-loaded-adapters, which is its --max-cpu-loras)",
    )
    max_lora_rank: int = Field(
        64,
        description="--engine vllm: the largest adapter rank served, one of vLLM's "
        f"{', '.join(map(str, VLLM_LORA_RANKS))} (a larger one is refused at load)",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="--engine vllm: GPUs (or CPU ranks) per replica")
    pipeline_parallel_size: int = Field(1, ge=1, description="--engine vllm: pipeline stages")
    data_parallel_size: int = Field(1, ge=1, description="--engine vllm: data-parallel engine ranks")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="--engine vllm: vLLM's executor (ray: across nodes); default: vLLM's choice"
    )

    parity_probe: Literal["auto", "on", "off"] = Field(
        "auto",
        description="--engine vllm: check vLLM's logprobs against a transformers forward at startup "
        "(auto: when that CPU copy of the weights fits in half the memory available; docs/deploy.md)",
    )

    _location = field_validator("adapters_dir", mode="before")(location_value)

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, rank: int) -> int:
        if rank not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {', '.join(map(str, VLLM_LORA_RANKS))} (vLLM's sizes)")
        return rank

    @model_validator(mode="after")
    def _vllm_flags_need_vllm(self) -> Settings:
        """The vLLM-only flags are refused by name with the native engine: never silently ignored."""
        if self.engine == "vllm":
            return self
        given = [
            flag_name(name)
            for name in VLLM_ONLY_FIELDS
            if getattr(self, name) != Settings.model_fields[name].get_default(call_default_factory=True)
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} need --engine vllm (the native engine runs one device and always "
                "probes its forward against transformers')"
            )
        return self

    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_image_pixels, self.max_images)

    def engine_config(self) -> EngineConfig:
        """What the engine needs of these settings: each EngineConfig field is the setting of its name."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)})


QUANTIZATION_ALIASES = {"load_in_4bit": "4bit", "load_in_8bit": "8bit"}
"""The server's first spelling of ``--quantization``, kept working: ``--load-in-4bit`` is
``--quantization 4bit`` (and ``LORAYARD_LOAD_IN_4BIT=true`` is ``LORAYARD_QUANTIZATION=4bit``)."""

_TRUE = ("1", "true", "yes", "on")


def _env_value(name: str) -> str | None:
    return os.environ.get(ENV_PREFIX + name.upper())


def _quantization(flag_value: str | None, aliases: dict[str, bool | None]) -> str | None:
    """--quantization, else its aliases, else the same from the environment; two that differ: an error."""
    for layer in (
        [flag_value, *(QUANTIZATION_ALIASES[a] for a, on in aliases.items() if on)],
        [
            _env_value("quantization"),
            *(q for a, q in QUANTIZATION_ALIASES.items() if (_env_value(a) or "").lower() in _TRUE),
        ],
    ):
        chosen = {value for value in layer if value is not None}
        if len(chosen) > 1:
            raise ValueError(f"choose one quantization, got {' and '.join(sorted(chosen))}")
        if chosen:
            return chosen.pop()
    return None


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Flags and LORAYARD_* env -> Settings; a bad value exits with the flag named."""
    parser = argparse.ArgumentParser(prog="lorayard serve", description="LoRAyard multi-adapter server")
    add_field_flags(
        parser, Settings.model_fields, help_suffix=lambda name: f" (env {ENV_PREFIX}{name.upper()})"
    )
    for alias, quantization in QUANTIZATION_ALIASES.items():
        parser.add_argument(
            flag_name(alias),
            action="store_true",
            default=None,
            help=f"alias of --quantization {quantization}",
        )
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = args[name] if args[name] is not None else _env_value(name)
        if value is not None:
            values[name] = value
    try:
        values["quantization"] = _quantization(
            args["quantization"], {a: args[a] for a in QUANTIZATION_ALIASES}
        )
    except ValueError as exc:
        parser.error(f"--quantization: {exc}")
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()
        )
        parser.error(problems)
        raise  # unreachable: parser.error exits


def flags_markdown() -> str:
    """The server's flags as a markdown table (flag, env, default, meaning), from the Settings fields."""
    aliases = ", ".join(f"`{flag_name(a)}` is `--quantization {q}`" for a, q in QUANTIZATION_ALIASES.items())
    table = flags_table(Settings.model_fields, env=lambda name: ENV_PREFIX + name.upper())
    return f"{table}\nAliases: {aliases} (and `{ENV_PREFIX}LOAD_IN_4BIT=true` likewise).\n"
