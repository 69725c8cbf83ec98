"""A real server process on 127.0.0.1 with the real embedded model and a volume of test adapters."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorayard.testing.random_adapter import build_random_adapter
from lorayard.testing.server import ServerProcess, publish_folder, start_server
from lorayard.volume import AdapterVolume

__all__ = ["ServerProcess", "publish_folder", "start_server"]

# Different ranks and target modules: one batch must mix them.
REAL_ADAPTERS = {
    "qv8": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "all16": {"r": 16, "lora_alpha": 16, "target_modules": "all-linear"},
}


def make_real_adapter(base_path: Path, out: Path, seed: int, **lora) -> None:
    # 0.3: changes answers without turning them into noise
    build_random_adapter(base_path, out, seed, b_scale=0.3, **lora)


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
