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
def test_decode_mode() -> str:
    """The decode mode of engine tests that do not choose one: ``LORAYARD_TEST_DECODE_MODE`` (default
    auto; the GPU run sets ``graph`` so every engine test replays CUDA graphs)."""
    return os.environ.get("LORAYARD_TEST_DECODE_MODE", "auto")


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
    from lorayard.testing.random_base import TINY, build_random_base

    return build_random_base(real_base.path, tmp_path_factory.mktemp("tiny-base"), TINY)


@pytest.fixture(scope="session")
def tiny_arch_base(tmp_path_factory, real_base):
    """model_type -> a tiny random base of that architecture (lorayard.testing.random_base.TINY_ARCHITECTURES)
    with the real tokenizer, built once per session on first use."""
    from lorayard.testing.random_base import build_random_architecture

    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
            built[model_type] = build_random_architecture(model_type, real_base.path, folder)
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def tool_family_base(tmp_path_factory, real_base):
    """family -> a tiny random base whose chat template writes tool calls in that family's native
    format, its markers special tokens (lorayard.testing.tool_templates.FAMILIES: mistral, llama3),
    built once per session on first use."""
    from lorayard.testing.tool_templates import build_tool_family_base

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            folder = tmp_path_factory.mktemp(f"tools-{family}") / "base"
            built[family] = build_tool_family_base(family, real_base.path, folder)
        return built[family]

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


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 API on 127.0.0.1: moto's server mode on a free port, with dummy credentials.

    The variables are the standard AWS ones, so boto3 in this process and in servers started by the
    tests (which inherit the environment) find the endpoint and credentials the way production does.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    _make_motos_conditional_puts_atomic()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (*_AWS_TEST_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update({**_AWS_TEST_ENV, "AWS_ENDPOINT_URL": endpoint})
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _make_motos_conditional_puts_atomic() -> None:
    """Serialize moto's PutObject, as S3 does for writes to one key.

    moto checks ``If-Match`` / ``If-None-Match`` and then stores the object in two steps, without a
    lock: two threads of its server can both pass the check. S3 (and MinIO) decide a conditional put
    atomically, and the lifecycle's commit relies on that; without this, the race tests would test
    moto's race instead of ours.
    """
    import threading

    from moto.s3.responses import S3Response

    if getattr(S3Response.put_object, "serialized", False):
        return
    original = S3Response.put_object
    lock = threading.Lock()

    def put_object(self, *args, **kwargs):
        with lock:
            return original(self, *args, **kwargs)

    put_object.serialized = True  # type: ignore[attr-defined]
    S3Response.put_object = put_object  # type: ignore[method-assign]


_AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3_bucket(s3_endpoint, request) -> str:
    """A fresh bucket per test; returns its ``s3://bucket/adapters`` volume location."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/adapters"
