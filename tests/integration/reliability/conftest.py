"""Fault-injection fixtures: a tiny-base server over a volume we break on purpose.

Servers and adapters come from ``lorayard.testing.server``, shared with the other integration tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lorayard.testing.random_adapter import build_random_adapter
from lorayard.testing.server import ServerProcess, publish_folder, start_server
from lorayard.volume import AdapterVolume

__all__ = ["ServerProcess", "make_tiny_adapter", "publish_folder", "start_server"]

API_KEY = "reliability-key"


def make_tiny_adapter(base_dir: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A random q/v LoRA on the tiny base, in PEFT's own format."""
    build_random_adapter(base_dir, out, seed, r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return out


@pytest.fixture(scope="session")
def tiny_adapter_source(tiny_base_dir, tmp_path_factory) -> Path:
    """One good adapter on the tiny base, outside any volume."""
    return make_tiny_adapter(tiny_base_dir, tmp_path_factory.mktemp("tiny-adapter") / "good", seed=1)


@pytest.fixture(scope="session")
def other_adapter_source(tiny_base_dir, tmp_path_factory) -> Path:
    """A second good adapter (another rank), to replace folders with."""
    return make_tiny_adapter(tiny_base_dir, tmp_path_factory.mktemp("tiny-adapter2") / "other", seed=2, r=8)


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def small_server(base_dir: Path, root: Path, adapter: Path, *flags: str) -> ServerProcess:
    """A tiny-base server over a volume at ``root`` holding ``adapter`` as ``ok``, with limits that keep
    every request cheap (256-token window, 64 tokens out); ``flags`` add to or override them."""
    copy_folder(adapter, root / "adapters" / "ok")
    return start_server(
        [
            *("--adapters-dir", str(root / "adapters"), "--base-model", str(base_dir)),
            *("--max-model-len", "256", "--max-tokens-limit", "64", *flags),
        ],
        root / "server.log",
    )


@pytest.fixture(scope="module")
def fault_volume(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fault-volume") / "adapters"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def fault_server(tiny_base_dir, fault_volume, tmp_path_factory):
    """A tiny-base server polling the volume fast; every test breaks its own adapter names."""
    server = start_server(
        [
            *("--adapters-dir", str(fault_volume), "--base-model", str(tiny_base_dir)),
            *("--poll-interval", "0.2", "--max-model-len", "256", "--max-tokens-limit", "64"),
            *("--max-loaded-adapters", "4"),
        ],
        tmp_path_factory.mktemp("fault-logs") / "server.log",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fault_fingerprint(tiny_base_dir) -> str:
    from lorayard.base_model import resolve_base_model

    return resolve_base_model(str(tiny_base_dir)).fingerprint


@pytest.fixture(scope="module")
def volume(fault_volume) -> AdapterVolume:
    return AdapterVolume(fault_volume)
