"""Slow grammar compiles (issue 23, items 3 and 8) on a server whose schema limit lets them through:
they run on their own bounded pool, those of clients that left never start, one past the time limit
is a 400, and a SIGTERM while one compiles drains it (new connections get 503, not a refusal).

Each huge schema is distinct (no compile cache hit) and compiles for seconds on this CPU.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time

import httpx
import pytest

from lorayard.testing.server import metric_value

from .conftest import copy_folder, start_server
from .test_hostile_requests import JSON, PERSON, _schema_body, huge_enum

COMPILE_TIMEOUT_S = 1.0
HUGE = 30_000
"""Strings in a huge enum: ~0.4 MB of schema, seconds of compile on this CPU (a few, unloaded)."""


def _huge_body(seed: int) -> str:
    return json.dumps(_schema_body(huge_enum(HUGE, seed)))


def _server_args(root, tiny_base_dir, compile_timeout_s: float = COMPILE_TIMEOUT_S) -> list[str]:
    return [
        *("--adapters-dir", str(root / "adapters"), "--base-model", str(tiny_base_dir)),
        *("--max-model-len", "256", "--max-tokens-limit", "64"),
        *("--max-schema-bytes", str(4 << 20), "--max-body-bytes", str(8 << 20)),
        *("--grammar-compile-threads", "1", "--grammar-compile-timeout", str(compile_timeout_s)),
    ]


@pytest.fixture(scope="module")
def compile_server(tiny_base_dir, tmp_path_factory, tiny_adapter_source):
    root = tmp_path_factory.mktemp("compiles")
    copy_folder(tiny_adapter_source, root / "adapters" / "ok")
    server = start_server(_server_args(root, tiny_base_dir), root / "server.log")
    yield server
    server.stop()


def _abandon(url: str, body: str) -> None:
    """Send and hang up before the answer (the client's timeout closes the connection)."""
    with contextlib.suppress(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", content=body, headers=JSON, timeout=0.5)


def _compiles(url: str, outcome: str) -> float:
    return metric_value(httpx.get(url + "/metrics").text, "lorayard_grammar_compiles_total", outcome=outcome)


def test_abandoned_huge_compiles_delay_neither_adapters_nor_small_schemas(compile_server):
    url = compile_server.base_url
    bodies = [_huge_body(seed) for seed in range(6)]
    threads = [threading.Thread(target=_abandon, args=(url, body)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    started = time.monotonic()
    adapter = httpx.post(
        url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "adapter": "ok"}, timeout=60
    )
    adapter_s = time.monotonic() - started
    innocent = httpx.post(url + "/v1/completions", json=_schema_body(PERSON), timeout=60)
    innocent_s = time.monotonic() - started
    assert adapter.status_code == 200 and innocent.status_code == 200, (adapter.text, innocent.text)
    # Adapter loads never wait for compiles (their own pool); the small schema waits for the huge
    # compile already running at most: the others' clients left while they waited, so they never ran.
    assert adapter_s < 5, adapter_s
    assert _compiles(url, "abandoned") >= 3, httpx.get(url + "/metrics").text
    assert innocent_s < 30, innocent_s
    assert "POST /v1/completions 499" in compile_server.log()
    assert " 500 " not in compile_server.log() and "Traceback" not in compile_server.log()


def test_a_compile_past_the_time_limit_is_a_400_naming_it(compile_server):
    response = httpx.post(
        compile_server.base_url + "/v1/completions", content=_huge_body(100), headers=JSON, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "grammar_compile_timeout" and "--grammar-compile-timeout" in error["message"]
    assert error["param"] == "response_format"


def test_sigterm_while_a_grammar_compiles_drains_it(tiny_base_dir, tmp_path_factory, tiny_adapter_source):
    root = tmp_path_factory.mktemp("drain-compile")
    copy_folder(tiny_adapter_source, root / "adapters" / "ok")
    server = start_server(_server_args(root, tiny_base_dir, compile_timeout_s=60), root / "server.log")
    answer: list[httpx.Response] = []

    def compiling() -> None:
        answer.append(
            httpx.post(server.base_url + "/v1/completions", content=_huge_body(200), headers=JSON, timeout=60)
        )

    thread = threading.Thread(target=compiling)
    thread.start()
    time.sleep(0.8)  # parsed, checked and compiling (the schema alone takes longer than this)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    # A new connection during the drain: answered 503 with JSON, not refused.
    probe = httpx.post(
        server.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10
    )
    assert probe.status_code == 503 and probe.json()["error"]["code"] == "draining", probe.text
    thread.join(60)
    assert server.process.wait(timeout=60) == 0
    (response,) = answer
    # Finished (the drain waited for its compile), with OpenAI's JSON, never uvicorn's plain text.
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
