"""A real LoRAyard server (``python -m lorayard.server``) on 127.0.0.1 with two random PEFT adapters.

The adapters are plain PEFT folders written by PEFT itself from the real base model (random, non-zero
LoRA weights, so each adapter really changes the output); no training job is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorayard.testing.random_adapter import build_random_adapter
from lorayard.testing.server import ServerProcess, start_server

API_KEY = "test-key"
ADAPTERS = ("alpha", "beta")


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    """Ends in /v1."""
    api_key: str
    adapters_dir: Path
    log: Path


@pytest.fixture(scope="session")
def random_adapters_dir(tmp_path_factory, real_base) -> Path:
    """DIR/<name>/ for each name in ADAPTERS: PEFT's own save_pretrained output, safetensors."""
    folder = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(ADAPTERS):
        build_random_adapter(
            real_base.path, folder / name, seed, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
        )
    return folder


class ServerLauncher:
    """Starts extra servers (for tests needing other flags); stops leftovers at session end."""

    def __init__(self) -> None:
        self.servers: list[ServerProcess] = []

    def start(self, adapters_dir: Path, log: Path, *extra: str) -> ServerProcess:
        server = start_server(["--adapters-dir", str(adapters_dir), *extra], log)
        self.servers.append(server)
        return server


@pytest.fixture(scope="session")
def server_launcher() -> Iterator[ServerLauncher]:
    launcher = ServerLauncher()
    yield launcher
    for server in launcher.servers:
        server.stop()


@pytest.fixture(scope="session")
def server(random_adapters_dir, tmp_path_factory) -> Iterator[RunningServer]:
    """The shared server for the client integration tests (API key required)."""
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    process = start_server(["--adapters-dir", str(random_adapters_dir)], log, api_key=API_KEY)
    try:
        yield RunningServer(base_url=process.v1, api_key=API_KEY, adapters_dir=random_adapters_dir, log=log)
    finally:
        process.stop()
