"""`python -m lorayard.server` on a GPU: seeded sampling, streaming, two adapters in flight, SIGTERM drain.

The same server process a user runs, on its default device (CUDA when there is one) and over the
default base (on the lent GPU machine, ``bench/gpu_run.sh`` points ``LORAYARD_BASE_MODEL`` at a
random-weight stand-in built there). Plain httpx, so it needs no client package the GPU image
lacks. Skipped without CUDA: on the CPU the other server tests cover the same ground.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

from .conftest import start_server

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _chat(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}], **extra}


def _stream(url: str, body: dict, out: list) -> threading.Thread:
    """POST a streaming request in a thread; ``out`` gets the status, then every non-empty SSE line."""

    def run() -> None:
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as response:
            out.append(response.status_code)
            out.extend(line for line in response.iter_lines() if line)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_seeded_sampling_streaming_and_two_adapters_on_the_gpu(real_server, real_base):
    url = real_server.v1 + "/chat/completions"
    models = {m["id"] for m in httpx.get(real_server.v1 + "/models", timeout=30).json()["data"]}
    assert {real_base.model_id, "qv8", "all16"} <= models
    seeded = _chat("qv8", max_tokens=24, temperature=1.0, top_p=0.9, seed=7)
    first, again = (httpx.post(url, json=seeded, timeout=120) for _ in range(2))
    assert first.status_code == again.status_code == 200, first.text
    assert first.json()["choices"][0]["message"] == again.json()["choices"][0]["message"]
    # Both adapters streaming at once, next to a plain-base request.
    outs: list[list] = [[], []]
    threads = [
        _stream(url, _chat(name, max_tokens=32, ignore_eos=True), out)
        for name, out in zip(("qv8", "all16"), outs, strict=True)
    ]
    base = httpx.post(url, json=_chat(real_base.model_id, max_tokens=8), timeout=120)
    for thread in threads:
        thread.join(timeout=120)
    assert base.status_code == 200, base.text
    for out in outs:
        assert out[0] == 200 and out[-1] == "data: [DONE]", out[:3]
        chunks = [json.loads(line[6:]) for line in out[1:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(c["choices"][0]["delta"].get("content") or "") for c in chunks) > 0


def test_sigterm_drains_a_stream_on_the_gpu_and_exits_zero(real_volume, tmp_path):
    server = start_server(["--adapters-dir", str(real_volume)], tmp_path / "server.log")
    url = server.v1 + "/chat/completions"
    out: list = []
    thread = _stream(url, _chat("all16", max_tokens=200, ignore_eos=True), out)
    time.sleep(1.0)
    server.process.terminate()
    thread.join(timeout=120)
    assert server.process.wait(timeout=120) == 0, server.log()[-2000:]
    assert out[0] == 200 and out[-1] == "data: [DONE]"
    assert json.loads(out[-2][6:])["choices"][0]["finish_reason"] == "length"
