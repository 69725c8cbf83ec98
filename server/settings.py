"""Server settings: one pydantic model; every field is a flag ``--x-y`` and an env var ``LORAYARD_X_Y``.

Precedence: flag > environment > the field's default (the one source of truth for each default).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorayard.base_model import default_base_model
from lorayard.s3_storage import DEFAULT_CACHE_BYTES, DEFAULT_CACHE_DIR
from lorayard.storage import is_object_store

ENV_PREFIX = "LORAYARD_"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    adapters_dir: Path | str = Field(
        Path("adapters"), description="the adapters volume to serve from: a folder or s3://bucket/prefix"
    )
    adapter_cache_dir: Path = Field(
        DEFAULT_CACHE_DIR, description="where versions downloaded from an object store are kept"
    )
    adapter_cache_gb: float = Field(
        DEFAULT_CACHE_BYTES / 2**30, gt=0, description="bound of that cache (least recently used go first)"
    )
    base_model: str = Field(default_factory=default_base_model, description="alias, local folder or hub id")
    load_in_4bit: bool = Field(False, description="load the base 4-bit NF4 (bitsandbytes)")
    load_in_8bit: bool = Field(False, description="load the base 8-bit (bitsandbytes)")
    device: str | None = Field(None, description="cpu | cuda | cuda:N (default: cuda if available)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: str | None = Field(
        None, description="require 'Authorization: Bearer KEY' on every route but /health"
    )
    metrics_public: bool = Field(True, description="serve /metrics without the API key")
    max_batch_size: int = Field(16, ge=1, le=1024, description="running requests (KV slots) at most")
    max_loaded_adapters: int = Field(8, ge=1, description="adapter versions resident in memory at most")
    max_queue: int = Field(256, ge=1, description="waiting requests at most; past it: 429")
    max_model_len: int = Field(2048, ge=16, description="context window: prompt + max_tokens")
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(8, ge=1, description="largest n (choices per request)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body size limit (413 past it)")
    kv_cache_memory_gb: float | None = Field(None, gt=0, description="KV-cache budget (default: 4 GB CPU)")
    prefill_chunk: int = Field(256, ge=1, description="prompt tokens prefilled per engine step")
    poll_interval: float = Field(
        1.0, gt=0, description="seconds between adapters-volume scans (LATEST, canary splits, new adapters)"
    )
    drain_timeout: float = Field(60.0, ge=0, description="seconds SIGTERM waits for in-flight requests")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("adapters_dir", mode="before")
    @classmethod
    def _location(cls, value: object) -> object:
        # An s3:// URL stays a string (a Path would fold its '//'); anything else is a folder.
        if isinstance(value, str) and not is_object_store(value):
            return Path(value)
        return value

    @model_validator(mode="after")
    def _one_quantization(self) -> Settings:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("choose one of --load-in-4bit and --load-in-8bit")
        return self

    @property
    def quantization(self) -> Literal["4bit", "8bit"] | None:
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None


def _env_value(name: str) -> str | None:
    return os.environ.get(ENV_PREFIX + name.upper())


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Flags and LORAYARD_* env -> Settings; a bad value exits with the flag named."""
    parser = argparse.ArgumentParser(prog="python -m server", description="LoRAyard multi-adapter server")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f" (env {ENV_PREFIX}{name.upper()})"
        if field.annotation is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=field.description + env
            )
        else:
            parser.add_argument(flag, default=None, help=field.description + env)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = args[name] if args[name] is not None else _env_value(name)
        if value is not None:
            values[name] = value
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()
        )
        parser.error(problems)
        raise  # unreachable: parser.error exits
