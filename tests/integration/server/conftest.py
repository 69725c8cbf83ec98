"""A real server process on 127.0.0.1 with the real embedded model and a volume of test adapters."""

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
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorayard.volume import AdapterVolume, BaseModelRef, Manifest

REPO = Path(__file__).resolve().parents[3]

# Different ranks and target modules: one batch must mix them.
REAL_ADAPTERS = {
    "qv8": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "all16": {"r": 16, "lora_alpha": 16, "target_modules": "all-linear"},
}


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
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def start_server(
    args: list[str], log_path: Path, *, env: dict | None = None, timeout: float = 120
) -> ServerProcess:
    port = free_port()
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})},
    )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    headers = (
        {"Authorization": f"Bearer {env['LORAYARD_API_KEY']}"} if env and "LORAYARD_API_KEY" in env else {}
    )
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


def make_real_adapter(base_path: Path, out: Path, seed: int, **lora) -> None:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)  # changes answers without turning them into noise
    peft_model.save_pretrained(out, safe_serialization=True)


def publish_folder(volume: AdapterVolume, name: str, source: Path, fingerprint: str, base_id: str) -> int:
    with volume.staging(name) as staged:
        for file in source.iterdir():
            (staged / file.name).write_bytes(file.read_bytes())
        manifest = Manifest(name=name, version=0, base_model=BaseModelRef(id=base_id, sha256=fingerprint))
        return volume.publish(staged, manifest).version


@pytest.fixture(scope="session")
def real_adapter_sources(tmp_path_factory, real_base) -> dict[str, Path]:
    """Random PEFT adapters on the real base, in PEFT's format, outside any volume."""
    root = tmp_path_factory.mktemp("real-adapter-sources")
    for seed, (name, spec) in enumerate(REAL_ADAPTERS.items()):
        make_real_adapter(real_base.path, root / name, seed, **spec)
    make_real_adapter(real_base.path, root / "qv8-v2", 99, **REAL_ADAPTERS["qv8"])
    return root


@pytest.fixture(scope="session")
def real_volume(tmp_path_factory, real_base, real_adapter_sources) -> Path:
    """qv8 published (v1) with a manifest; all16 as a plain PEFT folder."""
    root = tmp_path_factory.mktemp("real-volume")
    volume = AdapterVolume(root)
    publish_folder(volume, "qv8", real_adapter_sources / "qv8", real_base.fingerprint, real_base.model_id)
    plain = root / "all16"
    plain.mkdir()
    for file in (real_adapter_sources / "all16").iterdir():
        (plain / file.name).write_bytes(file.read_bytes())
    return root


@pytest.fixture(scope="session")
def real_server(real_volume, tmp_path_factory):
    server = start_server(
        ["--adapters-dir", str(real_volume), "--poll-interval", "0.3", "--max-tokens-limit", "256"],
        tmp_path_factory.mktemp("logs") / "real-server.log",
    )
    yield server
    server.stop()
