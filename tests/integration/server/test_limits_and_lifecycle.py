"""Limits, auth and lifecycle on a real server process over the tiny base (fast to start)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from lorayard.testing.server import metric_value

from .conftest import start_server

KEY = "s3cret-key"
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def limited_server(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("limited")
    (root / "adapters").mkdir()
    server = start_server(
        [
            *("--adapters-dir", str(root / "adapters"), "--base-model", str(tiny_base_dir)),
            *(
                "--max-batch-size",
                "1",
                "--max-queue",
                "1",
                "--max-body-bytes",
                "4096",
                "--max-model-len",
                "128",
            ),
            "--metrics-public",
        ],
        root / "server.log",
        env={"LORAYARD_API_KEY": KEY},
    )
    yield server
    server.stop()


def _auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_api_key_on_every_route_but_health(limited_server, tiny_base_dir):
    url = limited_server.base_url
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200  # --metrics-public
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/ready")):
        for headers in ({}, _auth("wrong")):
            response = httpx.request(method, url + path, json=CHAT, headers=headers)
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=limited_server.v1, api_key=KEY, max_retries=0)
    assert client.chat.completions.create(
        model=str(tiny_base_dir), messages=CHAT["messages"], max_tokens=2
    ).usage
    assert KEY not in limited_server.log(), "the API key must never be logged"


def test_body_size_and_context_window(limited_server):
    url = limited_server.v1 + "/chat/completions"
    big = {"messages": [{"role": "user", "content": "x" * 10_000}]}
    response = httpx.post(url, json=big, headers=_auth())
    assert response.status_code == 413
    medium = {"messages": [{"role": "user", "content": "hi " * 150}], "max_tokens": 4}
    response = httpx.post(url, json=medium, headers=_auth())
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def _stream_in_thread(url: str, body: dict, out: list) -> threading.Thread:
    def run():
        with httpx.stream(
            "POST", url, json={**body, "stream": True}, headers=_auth(), timeout=60
        ) as response:
            out.append(response.status_code)
            out.extend(line for line in response.iter_lines() if line)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_queue_full_is_429_with_retry_after(limited_server):
    """One slot and a queue of one: of a burst of requests, the extra ones get 429 at once."""
    url = limited_server.v1 + "/chat/completions"
    body = {**CHAT, "max_tokens": 90, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(headers=_auth(), timeout=60) as client:
            return await asyncio.gather(*(client.post(url, json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    assert set(statuses) == {200, 429}
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"]
    assert rejected.json()["error"]["type"] == "rate_limit_error"


def test_client_disconnect_frees_its_kv_blocks(limited_server):
    url = limited_server.v1 + "/chat/completions"
    with httpx.stream(
        "POST", url, json={**CHAT, "max_tokens": 120, "ignore_eos": True, "stream": True}, headers=_auth()
    ) as response:
        for _ in zip(range(3), response.iter_lines(), strict=False):
            pass  # read a little, then hang up
    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(limited_server.base_url + "/metrics").text
        gauges = {
            "running": metric_value(metrics, "lorayard_num_requests_running"),
            "kv_blocks_used": metric_value(metrics, "lorayard_kv_cache_blocks", state="used"),
        }
        if "lorayard_kv_cache_blocks" in metrics and not any(gauges.values()):
            break
        assert time.monotonic() < deadline, f"not freed after the client went away: {gauges}"
        time.sleep(0.2)
    assert httpx.post(url, json=CHAT, headers=_auth(), timeout=30).status_code == 200


def test_sigterm_drains_streams_and_exits_zero(tiny_base_dir, tmp_path):
    (tmp_path / "adapters").mkdir()
    server = start_server(
        ["--adapters-dir", str(tmp_path / "adapters"), "--base-model", str(tiny_base_dir)], tmp_path / "log"
    )
    url = server.v1 + "/chat/completions"
    out: list = []
    thread = _stream_in_thread(url, {**CHAT, "max_tokens": 200, "ignore_eos": True}, out)
    time.sleep(0.5)
    server.process.terminate()
    time.sleep(0.2)
    try:
        refused = httpx.post(url, json=CHAT, timeout=10).status_code
    except httpx.HTTPError:
        refused = "closed"
    thread.join(timeout=60)
    assert server.process.wait(timeout=60) == 0
    assert refused in (503, "closed")
    assert out[0] == 200 and out[-1] == "data: [DONE]"
    finals = [json.loads(line[6:]) for line in out[1:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
