"""A base the engine cannot serve exactly stops ``python -m lorayard.server`` at startup, non-zero, with a
one-line reason naming the architecture and the supported ones; it never lingers unready."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from lorayard.architectures import ARCHITECTURES


@pytest.mark.parametrize("model_type", ["mixtral"])
def test_unsupported_base_exits_non_zero_naming_it(tiny_arch_base, tmp_path, model_type):
    (tmp_path / "adapters").mkdir()
    command = [sys.executable, "-m", "lorayard.server", "--host", "127.0.0.1", "--port", "0"]
    command += ["--base-model", str(tiny_arch_base(model_type)), "--adapters-dir", str(tmp_path / "adapters")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert f"base architecture {model_type!r}" in last
    assert all(supported in last for supported in ARCHITECTURES), last


def test_missing_base_exits_non_zero(tmp_path):
    (tmp_path / "adapters").mkdir()
    (tmp_path / "not-a-model").mkdir()
    command = [sys.executable, "-m", "lorayard.server", "--host", "127.0.0.1", "--port", "0"]
    command += ["--base-model", str(tmp_path / "not-a-model"), "--adapters-dir", str(tmp_path / "adapters")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "has no config.json" in done.stderr.strip().splitlines()[-1]


def test_engine_vllm_without_vllm_exits_non_zero_saying_where_to_get_it(tmp_path):
    """The project's venv has no vLLM (it lives in .venv-vllm): --engine vllm stops the server at once."""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vLLM: test_vllm_engine.py serves with it")
    (tmp_path / "adapters").mkdir()
    command = [sys.executable, "-m", "lorayard.server", "--host", "127.0.0.1", "--port", "0"]
    command += ["--adapters-dir", str(tmp_path / "adapters"), "--engine", "vllm"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "--engine vllm needs vLLM" in last and "make install-vllm" in last, last
