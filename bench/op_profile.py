"""Where the time goes: torch-profiler op times grouped into a few categories that explain a ratio.

An engine profiles its own thread when its config names a ``torch_profile_dir`` (the server's
``--torch-profile-dir``; the profiler only sees the thread it runs on) and writes ``engine_ops.json``
there; a call on this thread is profiled directly.
Time not inside any torch op is Python and framework overhead: the wall time minus the ops' self time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.record import SuiteResult, markdown_table

GEMM = "GEMM (base and LoRA matmuls)"
CATEGORIES: dict[str, tuple[str, ...]] = {
    GEMM: ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"),
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


def profile_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--profile/--no-profile``: None until the suite resolves it (on unless --quick)."""
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"profile {what} (default: on, off with --quick)",
    )


def add_profile(result: SuiteResult, variant: str, seconds: dict[str, float]) -> None:
    """Record one variant's category times (from :func:`shares`) as ``kind: profile`` rows."""
    total = sum(seconds.values())
    for name, value in seconds.items():
        row = {"kind": "profile", "variant": variant, "category": name, "seconds": value}
        result.rows.append({**row, "share": value / total})


def profile_shares(rows: list[dict[str, Any]], variant: str) -> dict[str, float]:
    return {r["category"]: r["share"] for r in rows if r.get("kind") == "profile" and r["variant"] == variant}


def profile_table(rows: list[dict[str, Any]], variants: list[str], what: str) -> str:
    """A markdown section with each variant's share of time per category ('' when not profiled)."""
    by_variant = {v: profile_shares(rows, v) for v in variants}
    by_variant = {v: s for v, s in by_variant.items() if s}
    if not by_variant:
        return ""
    names = list(next(iter(by_variant.values())))
    table = [[name, *(f"{shares[name]:.0%}" for shares in by_variant.values())] for name in names]
    return (
        f"\n\nWhere the time goes (torch profiler, self time per op category; {what}):\n\n"
        + markdown_table(["category", *by_variant], table)
    )


def profile_here(call: Callable[[], Any]) -> tuple[list[dict[str, Any]], float]:
    """Run ``call`` on this thread under the profiler; returns (op rows, wall seconds)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        call()
        wall = time.perf_counter() - start
    rows = [{"op": e.key, "self_cpu_us": e.self_cpu_time_total} for e in profiler.key_averages()]
    return rows, wall


class EngineProfile:
    """A profile folder for an engine built inside the block (``EngineBench(..., profile_dir=folder)``);
    read its ops after the engine stops."""

    def __enter__(self) -> EngineProfile:
        self._folder = tempfile.TemporaryDirectory(prefix="lorayard-profile-")
        self.folder = Path(self._folder.name)
        return self

    def ops(self, timeout_s: float = 900) -> list[dict[str, Any]]:
        """The op rows the engine writes when it stops; summarising a long trace can outlast
        ``Engine.stop``'s join, so wait for the file."""
        path = self.folder / "engine_ops.json"
        deadline = time.monotonic() + timeout_s
        while not path.is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine wrote no profile to {path} in {timeout_s:.0f} s")
            time.sleep(0.5)
        return json.loads(path.read_text())

    def __exit__(self, *exc: object) -> None:
        self._folder.cleanup()
