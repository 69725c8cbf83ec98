"""Real servers and real adapters for the integration tests: one way to start ``python -m lorayard.server``.

A server under test is the exact process a user runs, on 127.0.0.1 and a free port; a test adapter
(``lorayard.testing.random_adapter``, PEFT's own output) is published to a volume by the volume contract.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from lorayard.volume import AdapterVolume, BaseModelRef, Manifest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base_url: str
    log_path: Path

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """SIGTERM (a graceful drain) by default; SIGKILL if it has not exited by ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


def start_server(
    args: list[str],
    log_path: Path,
    *,
    api_key: str | None = None,
    env: dict | None = None,
    timeout: float = 180,
) -> ServerProcess:
    """Start ``python -m lorayard.server ARGS`` and wait until ``/ready`` answers 200."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    key = api_key or env.get("LORAYARD_API_KEY")
    command = [
        sys.executable,
        "-m",
        "lorayard.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        *args,
    ]
    if api_key:
        command += ["--api-key", api_key]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(process, f"http://127.0.0.1:{command[command.index('--port') + 1]}", log_path)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.base_url + "/ready", headers=headers, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready in {timeout}s:\n{server.log()}")


def publish_folder(volume: AdapterVolume, name: str, source: Path, fingerprint: str, base_id: str) -> int:
    """Publish a PEFT folder as the next version of ``name`` through the volume contract."""
    with volume.staging(name) as staged:
        for file in source.iterdir():
            (staged / file.name).write_bytes(file.read_bytes())
        manifest = Manifest(name=name, version=0, base_model=BaseModelRef(id=base_id, sha256=fingerprint))
        version = volume.publish(staged, manifest).version
    assert version is not None  # None is a plain folder's; a published version always has its number
    return version
