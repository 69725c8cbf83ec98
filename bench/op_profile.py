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
    # The prepacked oneDNN/MKL linears (ours on the CPU, vLLM's CPU build) are GEMMs too.
    GEMM: (
        "aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
        "_linear_pointwise", "_mkl_linear", "onednn_mm", "weight_packed_linear",
    ),
    "attention": ("scaled_dot_product", "flash_attention", "aten::_softmax", "cpu_attention"),
    "KV cache writes and gathers": (
        "aten::index", "aten::index_put_", "aten::index_select", "aten::cat", "aten::copy_",
        "reshape_and_cache",
    ),
}  # fmt: skip
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


def trace_ops(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """Self CPU time per op name from a Chrome trace the torch profiler wrote (``export_chrome_trace``,
    ``tensorboard_trace_handler``: how vLLM saves its profiles). An op's self time is its duration less
    the ops nested in it on the same thread, as ``key_averages`` counts it."""
    by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "X" and event.get("cat") == "cpu_op":
            by_thread.setdefault((event.get("pid"), event.get("tid")), []).append(event)
    self_us: dict[str, float] = {}
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[tuple[float, list[float]]] = []  # (end, [children's time]) of the open ops
        own: list[tuple[str, float, list[float]]] = []
        for event in events:
            while stack and stack[-1][0] <= event["ts"]:
                stack.pop()
            children: list[float] = [0.0]
            if stack:
                stack[-1][1][0] += event["dur"]
            stack.append((event["ts"] + event["dur"], children))
            own.append((event["name"], event["dur"], children))
        for name, duration, children in own:
            self_us[name] = self_us.get(name, 0.0) + duration - children[0]
    return [{"op": name, "self_cpu_us": us} for name, us in self_us.items()]


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


def profile_seconds(rows: list[dict[str, Any]], variant: str) -> dict[str, float]:
    return {
        r["category"]: r["seconds"] for r in rows if r.get("kind") == "profile" and r["variant"] == variant
    }


def profile_table(rows: list[dict[str, Any]], variants: list[str], what: str, seconds: bool = False) -> str:
    """A markdown section with each variant's share of time per category ('' when not profiled);
    ``seconds``: each share with its seconds, for variants that ran the same work (side by side)."""
    by_variant = {v: profile_shares(rows, v) for v in variants}
    by_variant = {v: s for v, s in by_variant.items() if s}
    if not by_variant:
        return ""
    names = list(next(iter(by_variant.values())))
    times = {v: profile_seconds(rows, v) for v in by_variant}

    def cell(variant: str, name: str) -> str:
        share = f"{by_variant[variant][name]:.0%}"
        return f"{share} ({times[variant][name]:.2f} s)" if seconds else share

    table = [[name, *(cell(v, name) for v in by_variant)] for name in names]
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
