"""The shared workload: random PEFT adapters on disk, and an in-process engine driven by asyncio.

Adapters come from ``lorayard.testing.random_adapter`` (PEFT's own output, as a user's would be)
and are kept in a
cache folder keyed by their spec, so reruns skip the making.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_args

import torch

from lorayard.adapter_files import load_adapter
from lorayard.base_model import ResolvedBaseModel, cache_dir, default_base_model, resolve_base_model
from lorayard.server.engine.config import DecodeMode
from lorayard.server.engine.engine import Engine
from lorayard.server.engine.types import Request, SamplingParams
from lorayard.server.settings import Settings
from lorayard.testing.random_adapter import build_random_adapter

WARMUP_TOKENS = 8
"""Tokens per request in a suite's untimed warm-up run of each variant: on a GPU the first run of a
shape loads kernels and picks GEMM algorithms, and measured up to 6x slower than the next."""

ALL_LINEAR = "all-linear"
QV = ("q_proj", "v_proj")


def decode_mode_flag(parser: argparse.ArgumentParser) -> None:
    """``--decode-mode``: the engine's setting of that name (default: the server's, auto)."""
    parser.add_argument(
        "--decode-mode",
        choices=get_args(DecodeMode),
        default=None,
        help="the engine's --decode-mode (default: the server's, auto: graph on a GPU, eager on the CPU)",
    )


@dataclass(frozen=True)
class AdapterSpec:
    """A random LoRA: rank, targets ("all-linear" or module names), seed."""

    name: str
    rank: int
    targets: str | tuple[str, ...]
    seed: int

    def digest(self, base: ResolvedBaseModel) -> str:
        text = json.dumps({**asdict(self), "base": str(base.path), "v": 1}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def mixed_specs(count: int, ranks: tuple[int, ...] = (8, 16, 32, 64)) -> list[AdapterSpec]:
    """``count`` adapters cycling through ranks, alternating all-linear and q/v targets."""
    return [
        AdapterSpec(
            f"a{i:04d}-r{ranks[i % len(ranks)]}", ranks[i % len(ranks)], ALL_LINEAR if i % 2 == 0 else QV, i
        )
        for i in range(count)
    ]


def adapter_cache() -> Path:
    return cache_dir() / "bench-adapters"


def make_adapters(
    base: ResolvedBaseModel, specs: list[AdapterSpec], root: Path | None = None
) -> dict[str, Path]:
    """Write each spec as a PEFT folder (cached by spec digest); returns name -> folder."""
    from transformers import AutoModelForCausalLM

    root = root or adapter_cache()
    folders = {s.name: root / f"{s.name}-{s.digest(base)}" for s in specs}
    missing = [s for s in specs if not (folders[s.name] / "adapter_model.safetensors").is_file()]
    if not missing:
        return folders
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    for spec in missing:
        targets = spec.targets if isinstance(spec.targets, str) else list(spec.targets)
        tmp = folders[spec.name].with_suffix(".tmp")
        peft_model = build_random_adapter(
            model, tmp, spec.seed, r=spec.rank, lora_alpha=2 * spec.rank, target_modules=targets
        )
        tmp.rename(folders[spec.name])
        model = peft_model.unload()  # the base again, without LoRA layers, for the next spec
    return folders


def load_base(tiny: Path | None = None) -> ResolvedBaseModel:
    """The embedded base, or a local folder (the unit test's tiny model)."""
    return resolve_base_model(None if tiny is None else str(tiny))


def base_label(tiny: Path | None) -> str:
    """The base a result names: the unit tests' tiny model, or the default base (``$LORAYARD_BASE_MODEL``
    when set, as on a GPU machine that runs a random-weight stand-in from
    ``lorayard.testing.random_base``)."""
    return "tiny" if tiny else default_base_model()


@dataclass
class AdapterSlot:
    """What the registry hands the engine (an AdapterHandle): the adapter's key and engine slot; a
    bench adapter is one version, so its name is its key."""

    key: str
    slot: int

    @property
    def name(self) -> str:
        return self.key


class EngineBench:
    """An engine with adapters resident, plus a helper that runs a batch of requests and times it."""

    def __init__(
        self,
        base: ResolvedBaseModel,
        device: str,
        max_batch_size: int,
        max_model_len: int,
        profile_dir: Path | None = None,
        kv_cache_memory_gb: float | None = None,
        decode_mode: DecodeMode | None = None,
        max_loaded_adapters: int | None = None,
    ) -> None:
        """Every other engine setting is the server's default; ``profile_dir``: see EngineProfile;
        ``decode_mode`` None: the server's default (``--decode-mode``); ``max_loaded_adapters``: how
        many adapters the suite loads, if more than the server's default (the stacked LoRA's rows)."""
        settings = Settings(
            device=device,
            max_batch_size=max_batch_size,
            max_model_len=max_model_len,
            torch_profile_dir=profile_dir,
            kv_cache_memory_gb=kv_cache_memory_gb,
            **({} if decode_mode is None else {"decode_mode": decode_mode}),
            **({} if max_loaded_adapters is None else {"max_loaded_adapters": max_loaded_adapters}),
        )
        self.engine = Engine.from_base(base, settings.engine_config(), eos_token_ids={2})
        self.handles: dict[str, AdapterSlot] = {}

    def load(self, folders: dict[str, Path]) -> None:
        for name, folder in folders.items():
            weights = load_adapter(folder, self.engine.hf_config)
            self.handles[name] = AdapterSlot(name, self.engine.load_adapter_weights(name, weights))

    def stop(self) -> None:
        self.engine.stop()


@dataclass
class RequestTiming:
    adapter: str | None
    submitted: float
    first_token: float
    finished: float
    tokens: int
    token_times: list[float]

    @property
    def ttft(self) -> float:
        return self.first_token - self.submitted

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


async def run_request(
    engine: Engine, prompt: list[int], max_tokens: int, handle: AdapterSlot | None
) -> RequestTiming:
    """Submit one greedy, ignore_eos request and time every token."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    submitted = time.perf_counter()
    stream = engine.submit(Request(uuid.uuid4().hex, prompt, params, handle))
    times = []
    async for event in stream:
        if event.token_id is not None:
            times.append(time.perf_counter())
        if event.error:
            raise RuntimeError(event.error)
    return RequestTiming(
        None if handle is None else handle.key, submitted, times[0], times[-1], len(times), times
    )


async def run_batch(
    engine: Engine, prompt: list[int], max_tokens: int | list[int], handles: list[AdapterSlot | None]
) -> tuple[float, list[RequestTiming]]:
    """All requests at once (one per handle; max_tokens per request or shared); returns (tok/s, timings).

    More requests than engine slots queue in the engine and join the batch as slots free up.
    """
    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(handles)
    start = time.perf_counter()
    timings = await asyncio.gather(
        *(run_request(engine, prompt, n, h) for n, h in zip(lengths, handles, strict=True))
    )
    elapsed = time.perf_counter() - start
    return sum(t.tokens for t in timings) / elapsed, list(timings)


def bench_prompt(base: ResolvedBaseModel, length: int = 32) -> list[int]:
    """A fixed prompt of ``length`` tokens from the base's tokenizer (deterministic)."""
    from lorayard.base_model import load_tokenizer

    text = (
        "The quick brown fox jumps over the lazy dog while the committee discusses the budget for the "
        "coming year, including new servers, training runs, and a celebration for the whole team. " * 8
    )
    ids = load_tokenizer(base)(text)["input_ids"]
    return list(ids[:length])
