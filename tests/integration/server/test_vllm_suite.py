"""Runs test_vllm_engine.py (the serving suite's core against ``--engine vllm``) in the vLLM venv,
which ``make test`` builds first (``make install-vllm``): vLLM pins its own torch, transformers and
xgrammar, so it cannot share the project's venv. Skipped only where that venv does not exist."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
VLLM_PYTHON = Path(os.environ.get("LORAYARD_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON}: make install-vllm")
@pytest.mark.timeout(1800)
def test_the_serving_suite_passes_with_engine_vllm():
    suite = Path(__file__).with_name("test_vllm_engine.py")
    run = subprocess.run(
        [str(VLLM_PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", str(suite)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-2000:]
