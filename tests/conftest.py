"""Shared fixtures: the real embedded base model, a tiny random model built from its config, volumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The openai client honours proxy variables; tests only ever talk to loopback.
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TESTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers by folder (one rule, not a ``pytestmark`` per file): ``integration`` for tests/integration/,
    ``gpu`` for a tests/gpu/ folder and for every test that runs on ``test_device``."""
    for item in items:
        parts = item.path.resolve().relative_to(TESTS_DIR).parts
        if parts[0] == "integration":
            item.add_marker(pytest.mark.integration)
        if "gpu" in parts[:-1] or "test_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def test_device() -> str:
    """Where engine tests run: ``LORAYARD_TEST_DEVICE`` (default cpu; ``cuda`` on a GPU machine)."""
    return os.environ.get("LORAYARD_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def real_base():
    """The default base (``$LORAYARD_BASE_MODEL``, else the embedded SmolLM2-135M-Instruct converted once)."""
    from lorayard.base_model import resolve_base_model

    return resolve_base_model()


@pytest.fixture(scope="session")
def real_tokenizer(real_base):
    from lorayard.base_model import load_tokenizer

    return load_tokenizer(real_base)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, real_base) -> Path:
    """A tiny random Llama with the real tokenizer and chat template, as a local HF folder.

    Same architecture family and vocabulary as the real base, 2 layers and a narrow width, so unit
    tests run in seconds; built from the real config so shapes follow the same rules.
    """
    from bench.random_base import TINY, build_random_base

    return build_random_base(real_base.path, tmp_path_factory.mktemp("tiny-base"), TINY)


@pytest.fixture(scope="session")
def tiny_arch_base(tmp_path_factory, real_base):
    """model_type -> a tiny random base of that architecture (bench.random_base.TINY_ARCHITECTURES)
    with the real tokenizer, built once per session on first use."""
    from bench.random_base import build_random_architecture

    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
            built[model_type] = build_random_architecture(model_type, real_base.path, folder)
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def tiny_base(tiny_base_dir):
    from lorayard.base_model import resolve_base_model

    return resolve_base_model(str(tiny_base_dir))


@pytest.fixture
def adapters_dir(tmp_path) -> Path:
    folder = tmp_path / "adapters"
    folder.mkdir()
    return folder
