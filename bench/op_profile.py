"""Where the time goes: torch-profiler op times grouped into a few categories that explain a ratio.

The engine profiles its own thread when ``LORAYARD_TORCH_PROFILE_DIR`` is set (the profiler only sees
the thread it runs on) and writes ``engine_ops.json``; a call on this thread is profiled directly.
Time not inside any torch op is Python and framework overhead: the wall time minus the ops' self time.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from server.engine.engine import PROFILE_DIR_ENV

CATEGORIES: dict[str, tuple[str, ...]] = {
    "GEMM (base and LoRA matmuls)": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "flash_attention", "aten::_softmax"),
    "KV cache writes and gathers": ("aten::index", "aten::index_put_", "aten::cat", "aten::copy_"),
}
OTHER_OPS = "other ops (norms, rotary, activations, sampling)"
OVERHEAD = "Python and framework overhead (outside torch ops)"


def category(op: str) -> str:
    for name, patterns in CATEGORIES.items():
        if any(op == p or (not p.startswith("aten::") and p in op) for p in patterns):
            return name
    return OTHER_OPS


def shares(ops: list[dict[str, Any]], wall_s: float) -> dict[str, float]:
    """Seconds per category (ops' self CPU time), plus the overhead; the values sum to ``wall_s``."""
    seconds = dict.fromkeys([*CATEGORIES, OTHER_OPS], 0.0)
    for op in ops:
        seconds[category(op["op"])] += op["self_cpu_us"] / 1e6
    seconds[OVERHEAD] = max(0.0, wall_s - sum(seconds.values()))
    return seconds


def profile_here(call: Callable[[], Any]) -> tuple[list[dict[str, Any]], float]:
    """Run ``call`` on this thread under the profiler; returns (op rows, wall seconds)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        call()
        wall = time.perf_counter() - start
    rows = [{"op": e.key, "self_cpu_us": e.self_cpu_time_total} for e in profiler.key_averages()]
    return rows, wall


class EngineProfile:
    """Set the engine's profile folder for engines started inside the block; read their ops after."""

    def __enter__(self) -> EngineProfile:
        self._folder = tempfile.TemporaryDirectory(prefix="lorayard-profile-")
        self._previous = os.environ.get(PROFILE_DIR_ENV)
        os.environ[PROFILE_DIR_ENV] = self._folder.name
        return self

    def ops(self) -> list[dict[str, Any]]:
        """The op rows the engine wrote when it stopped."""
        return json.loads((Path(self._folder.name) / "engine_ops.json").read_text())

    def __exit__(self, *exc: object) -> None:
        if self._previous is None:
            os.environ.pop(PROFILE_DIR_ENV, None)
        else:
            os.environ[PROFILE_DIR_ENV] = self._previous
        self._folder.cleanup()
