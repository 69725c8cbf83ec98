"""Fixtures for the training job: small real data files and a runner for `python -m lorayard.train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

# Tiny-model runs: a handful of steps, short greedy answers, so each run takes seconds.
FAST = ["--batch-size", "4", "--eval-steps", "2", "--lr", "1e-3"]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": f"Answer number {i}."},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", chat_rows(10))


@pytest.fixture
def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.pop("LORAYARD_ADAPTERS_DIR", None)
    return env


@pytest.fixture
def tiny_args(tiny_base_dir, adapters_dir, chat_file) -> list[str]:
    """Flags for a fast run on the tiny random model (add --name, --max-steps ...)."""
    return [
        "--base-model", str(tiny_base_dir),
        "--adapters-dir", str(adapters_dir),
        "--data", str(chat_file),
        *FAST,
    ]  # fmt: skip


@pytest.fixture
def run_job(job_env) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `python -m lorayard.train ARGS` to completion in a real subprocess."""

    def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lorayard.train", *args],
            cwd=REPO,
            env=job_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def start_job(job_env) -> Callable[..., subprocess.Popen[str]]:
    """Start `python -m lorayard.train ARGS` in the background (for signal tests); killed at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(args: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorayard.train", *args],
            cwd=REPO,
            env=job_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
