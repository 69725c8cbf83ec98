"""Real servers for tests and benchmarks: one way to start ``lorayard serve``, one way to wait for a server.

A server under test is the exact process a user runs, on 127.0.0.1. Ours binds port 0 itself and
reports the port the OS chose (``--port-file``), so there is no gap between choosing a free port and
binding it; ``free_port`` is only for servers that cannot do that (llama.cpp's, an image's fixed
port). A test adapter (``lorayard.testing.random_adapter``, PEFT's own output) is published to a
volume by the volume contract.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lorayard.volume import AdapterVolume, BaseModelRef, Manifest


def free_port() -> int:
    """A port free now, for a server that cannot bind port 0 and report it (another process may take
    it before that server binds it: prefer ``start_server``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
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


def wait_ready(
    process: subprocess.Popen[bytes],
    url: str,
    log_path: Path,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 180,
) -> None:
    """Return once ``url`` answers 200; raise with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    process.wait(timeout=10)
    raise RuntimeError(f"{url} not ready in {timeout}s:\n{log_path.read_text(errors='replace')[-4000:]}")


def bound_port(process: subprocess.Popen[bytes], port_file: Path, log_path: Path, timeout: float) -> int:
    """The port a server started with ``--port 0 --port-file PORT_FILE`` bound, once it listens."""
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(timeout=10)
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"server never listened (exit {process.returncode}):\n{tail}")
        time.sleep(0.05)
    return int(port_file.read_text())


def start_server(
    args: list[str],
    log_path: Path,
    *,
    api_key: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    ready: bool = True,
) -> ServerProcess:
    """Start ``lorayard serve ARGS`` on 127.0.0.1 and a port it binds itself; by default wait until
    ``/ready`` answers 200 (``ready=False``: return once it listens)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    key = api_key or env.get("LORAYARD_API_KEY")
    port_file = Path(tempfile.mkdtemp(prefix="lorayard-port-")) / "port"
    command = [sys.executable, "-m", "lorayard.server", "--host", "127.0.0.1", "--port", "0"]
    command += ["--port-file", str(port_file), *args]
    if api_key:
        command += ["--api-key", api_key]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    started = time.monotonic()
    port = bound_port(process, port_file, log_path, timeout)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    if ready:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        remaining = max(1.0, timeout - (time.monotonic() - started))
        wait_ready(process, server.base_url + "/ready", log_path, headers=headers, timeout=remaining)
    return server


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples in a /metrics text whose labels include ``labels``
    (0.0 when none does: a counter not yet incremented has no sample)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (VmRSS from /proc; Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def publish_folder(volume: AdapterVolume, name: str, source: Path, fingerprint: str, base_id: str) -> int:
    """Publish a PEFT folder as the next version of ``name`` through the volume contract."""
    with volume.staging(name) as staged:
        for file in source.iterdir():
            (staged / file.name).write_bytes(file.read_bytes())
        manifest = Manifest(name=name, version=0, base_model=BaseModelRef(id=base_id, sha256=fingerprint))
        version = volume.publish(staged, manifest).version
    assert version is not None  # None is a plain folder's; a published version always has its number
    return version
