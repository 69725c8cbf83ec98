"""A peer server beside ours: start it on loopback, and read a load run the same way for both.

Shared by the suites that measure another server against ours over the same HTTP load
(``bench.llama_cpp``, ``bench.vllm_cpu``): the run summary counts tokens the same way for both sides,
and both processes start with the same thread settings.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from bench.record import median, percentile
from lorayard.testing.server import ServerProcess, free_port, wait_ready


def sample_tokens(sample: dict[str, Any], max_tokens: int) -> tuple[int, str]:
    """Output tokens of one load-test sample and how they were counted (usage, length, deltas).

    The server's usage when it sent one; else ``max_tokens`` if it stopped by length (llama.cpp streams
    no usage); else one per streamed text delta (a lower bound: a delta may hold several tokens).
    """
    if sample.get("output_tokens") is not None:
        return int(sample["output_tokens"]), "usage"
    if sample.get("finish_reason") == "length":
        return max_tokens, "length"
    if sample.get("ttft_s") is None:
        return 0, "deltas"
    return 1 + len(sample.get("itl_s") or []), "deltas"


def summarize_run(samples: list[dict[str, Any]], duration_s: float, max_tokens: int) -> dict[str, Any]:
    """One server's run: completed/errors, output tok/s, TTFT/ITL/e2e p50 (ms), how tokens were counted."""
    done = [s for s in samples if s.get("status") == "ok"]
    counted = [sample_tokens(s, max_tokens) for s in done]
    tokens = sum(n for n, _ in counted)
    ttft = [s["ttft_s"] * 1e3 for s in done if s.get("ttft_s") is not None]
    itl = [gap * 1e3 for s in done for gap in s.get("itl_s") or []]
    e2e = [s["e2e_s"] * 1e3 for s in done if s.get("e2e_s") is not None]
    return {
        "requests": len(samples),
        "completed": len(done),
        "errors": len(samples) - len(done),
        "finished_by_length": sum(1 for s in done if s.get("finish_reason") == "length"),
        "output_tokens": tokens,
        "tokens_counted_by": sorted({how for _, how in counted}),
        "duration_s": duration_s,
        "tokens_per_s": tokens / max(duration_s, 1e-9),
        "ttft_p50_ms": median(ttft),
        "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": median(itl),
        "e2e_p50_ms": median(e2e),
    }


def thread_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment both servers start with: torch reads OMP_NUM_THREADS at start; a peer that takes
    a thread flag instead is not harmed by it."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(extra or {})}


def start_peer(
    argv: list[str],
    threads: int,
    ready_path: str,
    log: Path,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> ServerProcess:
    """Start ``argv`` (+ --host, --port) on a free port; return once ``ready_path`` answers 200.
    (Peers cannot report a port they bound themselves, so every server started here takes ``free_port``.)"""
    port = free_port()
    with log.open("w") as fh:
        process = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(port)],
            cwd=log.parent,
            env=thread_env(threads, env),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log)
    wait_ready(process, server.base_url + ready_path, log, timeout=timeout)
    return server
