"""Hostile adapter folders on a live server (``--decode-mode static``), beside innocent traffic.

Issue 23, items 1 and 2: a config pattern that backtracks catastrophically in Python's ``re`` used to
freeze every request, /health and SIGTERM; an adapter with lora_alpha 1e308 / Infinity used to fill
the static step's shared scratch KV block with NaN, after which every answer was garbage. Here each
hostile folder (``lorayard.testing.hostile_adapter``) is requested while an innocent stream runs: the
stream finishes intact, /health answers throughout, each hostile adapter gets a clean 4xx naming its
field (the catastrophic pattern, which PEFT's semantics give no module, is served), later answers of
the base and a good adapter equal the ones before, and SIGTERM exits 0.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lorayard.testing.hostile_adapter import HOSTILE, HOSTILE_FIELDS, build_hostile_adapter

from .conftest import start_server

PROMPT = [{"role": "user", "content": "Tell me about rivers."}]


@pytest.fixture(scope="module")
def hostile_server(tiny_base_dir, tiny_adapter_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    volume = root / "adapters"
    volume.mkdir()
    shutil.copytree(tiny_adapter_source, volume / "good")
    for kind in HOSTILE:
        build_hostile_adapter(
            kind, tiny_base_dir, volume / kind.replace("_", "-"), outside=root / "outside" / kind
        )
    server = start_server(
        [
            *("--adapters-dir", str(volume), "--base-model", str(tiny_base_dir)),
            *("--decode-mode", "static", "--max-model-len", "256", "--max-loaded-adapters", "4"),
        ],
        root / "server.log",
    )
    yield server
    server.stop()


def _chat(server, adapter: str | None, max_tokens: int = 12) -> httpx.Response:
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "logprobs": True}
    if adapter is not None:
        body["adapter"] = adapter
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=120)


def _answers(server) -> list[tuple[str, list[float]]]:
    """The base's and the good adapter's answers, sent together so they share static decode steps."""
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda a: _chat(server, a), [None, "good", None, "good"]))
    answers = []
    for response in responses:
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        answers.append((choice["message"]["content"], [t["logprob"] for t in choice["logprobs"]["content"]]))
    return answers


def _innocent_stream(server, out: dict) -> None:
    body = {"messages": PROMPT, "max_tokens": 48, "temperature": 0, "stream": True, "ignore_eos": True}
    pieces, finish = [], None
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=120) as response:
        out["status"] = response.status_code
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["delta"].get("content") or "")
                finish = choice.get("finish_reason") or finish
    out["text"], out["finish"] = "".join(pieces), finish


def test_hostile_adapters_hurt_nothing_else(hostile_server):
    before = _answers(hostile_server)
    stream: dict = {}
    streamer = threading.Thread(target=_innocent_stream, args=(hostile_server, stream))
    streamer.start()
    for kind, field in HOSTILE_FIELDS.items():
        started = time.monotonic()
        response = _chat(hostile_server, kind.replace("_", "-"))
        assert time.monotonic() - started < 30, kind
        if not field:
            assert response.status_code == 200, (kind, response.text)
            continue
        assert 400 <= response.status_code < 500, (kind, response.text)
        assert field in response.json()["error"]["message"], (kind, response.text)
        assert httpx.get(hostile_server.base_url + "/health", timeout=2).status_code == 200
    streamer.join(timeout=120)
    assert stream["status"] == 200 and stream["finish"] == "length" and stream["text"], stream
    after = _answers(hostile_server)
    for (text_before, lp_before), (text_after, lp_after) in zip(before, after, strict=True):
        assert text_after == text_before
        assert lp_after == pytest.approx(lp_before, abs=1e-3)
    assert hostile_server.stop() == 0  # SIGTERM still drains and exits
