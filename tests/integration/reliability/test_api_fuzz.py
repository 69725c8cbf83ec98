"""Fuzz the running server: no 5xx, and no request can hurt another one running beside it.

Two fuzzers, both bounded (a tiny-base server where generation is milliseconds, a fixed number of
examples, per-request timeouts). Offline: they only talk to 127.0.0.1.

- hypothesis builds hostile generation bodies (ids out of the vocabulary or negative in the prompt,
  ``stop_token_ids``, ``logit_bias`` keys; ``min_tokens`` with impossible stops; bad schemas; ...)
  and sends each while an innocent greedy stream runs; the stream must end with the same text as
  when it ran alone, and the hostile request must get a 2xx or a 4xx, never a 5xx.
- schemathesis walks the server's own /openapi.json (every route, schema-shaped bodies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import small_server

MAX_EXAMPLES = 30
HOSTILE_EXAMPLES = 40
INNOCENT = {
    "prompt": "The quick brown fox",
    "max_tokens": 64,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


@pytest.fixture(scope="module")
def fuzz_server(tiny_base_dir, tmp_path_factory, tiny_adapter_source):
    root = tmp_path_factory.mktemp("fuzz")
    # Small limits keep every generated request cheap; the limits themselves are fuzzed.
    server = small_server(tiny_base_dir, root, tiny_adapter_source, "--max-n", "2")
    yield server
    server.stop()


def _stream_text(base_url: str, body: dict, running: threading.Event | None = None) -> str:
    """The text of a streamed completion; fails on any error event. ``running`` is set once the
    first chunk arrived (the request is in the engine's batch)."""
    text = ""
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += "".join(c["text"] for c in chunk["choices"])
            if running is not None:
                running.set()
    return text


# Token ids a client can send: valid, negative, one past the vocabulary, absurd.
token_ids = st.one_of(st.integers(0, 49151), st.integers(-3, -1), st.just(49152), st.just(1_000_000_000))
schemas = st.one_of(
    st.just({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
    st.just({"type": 5}),
    st.just({"$ref": "#/nowhere"}),
    st.just("not a schema"),
)
common = {
    "max_tokens": st.integers(0, 80),
    "min_tokens": st.integers(0, 4),
    "temperature": st.sampled_from([0.0, 0.7, 1.5]),
    "top_k": st.integers(-1, 5),
    "n": st.integers(1, 3),
    "seed": st.integers(0, 3),
    "stop_token_ids": st.lists(token_ids, max_size=3),
    "logit_bias": st.dictionaries(
        st.one_of(token_ids.map(str), st.just("x"), st.just("99999999999999999999")),
        st.one_of(st.floats(-100, 100), st.just(1e9), st.just(-101.0)),
        max_size=3,
    ),
    "stop": st.lists(st.text(max_size=3), max_size=5),
    "adapter": st.sampled_from(["ok", "missing", "../x", "ok@v9"]),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
    "response_format": st.one_of(
        st.just({"type": "json_object"}),
        schemas.map(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}),
    ),
}
completion_bodies = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(max_size=20), st.lists(token_ids, max_size=6))},
    optional={
        **common,
        "echo": st.booleans(),
        "logprobs": st.integers(0, 5),
        "prompt_logprobs": st.integers(0, 5),
    },
)
tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
chat_bodies = st.fixed_dictionaries(
    {"messages": st.just([{"role": "user", "content": "hi"}])},
    optional={
        **common,
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5),
        "tools": st.just([tool]),
        "tool_choice": st.sampled_from(
            ["auto", "none", "required", {"type": "function", "function": {"name": "g"}}]
        ),
    },
)
hostile = st.one_of(
    completion_bodies.map(lambda b: ("/v1/completions", b)),
    chat_bodies.map(lambda b: ("/v1/chat/completions", b)),
)


def _send(base_url: str, path: str, body: dict) -> tuple[int, str]:
    with httpx.stream("POST", base_url + path, json=body, timeout=60) as response:
        return response.status_code, response.read().decode(errors="replace")


def test_no_request_hurts_an_innocent_stream(fuzz_server):
    base_url = fuzz_server.base_url
    alone = _stream_text(base_url, INNOCENT)
    assert alone

    @settings(
        max_examples=HOSTILE_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(hostile)
    def check(case: tuple[str, dict]) -> None:
        path, body = case
        innocent: list[str | BaseException] = []
        started = threading.Event()

        def run_innocent() -> None:
            try:
                innocent.append(_stream_text(base_url, INNOCENT, started))
            except BaseException as exc:  # reported by the assertion below
                innocent.append(exc)
            finally:
                started.set()

        thread = threading.Thread(target=run_innocent)
        thread.start()
        started.wait(60)  # the innocent stream is running: the hostile request joins its batch
        status, text = _send(base_url, path, body)
        thread.join(60)
        assert status < 500, (path, body, status, text)
        assert '"code": "engine_error"' not in text and '"code":"engine_error"' not in text, (body, text)
        assert innocent == [alone], (path, body, innocent)

    check()
    assert fuzz_server.process.poll() is None, "the server died under fuzzing"
    assert " 500 " not in fuzz_server.log(), fuzz_server.log()[-4000:]


def test_schemathesis_finds_no_server_error(fuzz_server, tmp_path: Path):
    schema = fuzz_server.base_url + "/openapi.json"
    assert httpx.get(schema).status_code == 200
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        schema,
        *("--checks", "not_a_server_error"),
        *("--max-examples", str(MAX_EXAMPLES)),
        *("--request-timeout", "20"),
        *("--phases", "examples,coverage,fuzzing"),
        *("--seed", "1"),
        *("--generation-database", "none"),
        "--no-color",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_PROXY": "127.0.0.1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=tmp_path, env=env)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " 500 " not in fuzz_server.log(), "the server answered 500:\n" + fuzz_server.log()[-4000:]
    assert fuzz_server.process.poll() is None, "the server died under fuzzing"
