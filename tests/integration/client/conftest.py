"""A real LoRAyard server (``python -m server``) on 127.0.0.1 with two random PEFT adapters.

The adapters are plain PEFT folders written by PEFT itself from the real base model (random, non-zero
LoRA weights, so each adapter really changes the output); no training job is needed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"
ADAPTERS = ("alpha", "beta")
STARTUP_TIMEOUT_S = 180.0
REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    """Ends in /v1."""
    api_key: str
    adapters_dir: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def random_adapters_dir(tmp_path_factory, real_base) -> Path:
    """DIR/<name>/ for each name in ADAPTERS: PEFT's own save_pretrained output, safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorayard.base_model import load_base_model

    folder = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        model = load_base_model(real_base, device="cpu", dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(folder / name, safe_serialization=True)
    return folder


def start_server(
    adapters_dir: Path, log: Path, *extra: str, api_key: str | None = None
) -> tuple[subprocess.Popen, str]:
    """Start ``python -m server`` and wait until ``/ready`` answers 200; returns (process, base_url)."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "NO_PROXY": "127.0.0.1"}
    command = [sys.executable, "-m", "server", "--adapters-dir", str(adapters_dir), "--port", str(port)]
    command += extra
    if api_key:
        command += ["--api-key", api_key]
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    handle = log.open("wb")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{root}/ready", headers=headers, timeout=2).status_code == 200:
                return process, f"{root}/v1"
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    stop_server(process)
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class ServerLauncher:
    """Starts and stops extra servers (for tests needing other flags); stops leftovers at session end."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def start(self, adapters_dir: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
        process, base_url = start_server(adapters_dir, log, *extra)
        self.processes.append(process)
        return process, base_url

    def stop(self, process: subprocess.Popen) -> None:
        stop_server(process)


@pytest.fixture(scope="session")
def server_launcher() -> Iterator[ServerLauncher]:
    launcher = ServerLauncher()
    yield launcher
    for process in launcher.processes:
        stop_server(process)


@pytest.fixture(scope="session")
def server(random_adapters_dir, tmp_path_factory) -> Iterator[RunningServer]:
    """The shared server for the client integration tests (API key required)."""
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    process, base_url = start_server(random_adapters_dir, log, api_key=API_KEY)
    try:
        yield RunningServer(base_url=base_url, api_key=API_KEY, adapters_dir=random_adapters_dir, log=log)
    finally:
        stop_server(process)
