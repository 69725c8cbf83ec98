"""The serving suite's core against ``--engine vllm``: a real server on 127.0.0.1 with vLLM's engine
in-process (vLLM's CPU build), the embedded base in float32, the same volume and adapters as the
native suite.

It runs in the vLLM venv (``make install-vllm``): ``.venv-vllm/bin/python -m pytest <this file>``,
which tests/integration/server/test_vllm_suite.py does from the main suite. Imported in a venv
without vLLM, it is skipped: that test runs it where vLLM is.

One server for the whole module (vLLM takes minutes to start on this CPU); the drain test stops it,
so it comes last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from lorayard.testing.random_adapter import peft_reference
from lorayard.testing.server import metric_value, publish_folder, start_server
from lorayard.volume import AdapterVolume

from .conftest import BASE, QUESTIONS, WEATHER_TOOLS, ask, assert_mixed_batch_equals_peft

pytest.importorskip("vllm", reason="runs in the vLLM venv (make install-vllm; test_vllm_suite.py runs it)")


@pytest.fixture(scope="module")
def vllm_server(real_volume, tmp_path_factory):
    server = start_server(
        [
            *("--adapters-dir", str(real_volume), "--engine", "vllm", "--poll-interval", "0.3"),
            *("--max-tokens-limit", "256", "--max-loaded-adapters", "4", "--max-lora-rank", "16"),
        ],
        tmp_path_factory.mktemp("logs") / "vllm-server.log",
        timeout=900,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(vllm_server):
    return openai.OpenAI(base_url=vllm_server.v1, api_key="unused", max_retries=0, timeout=300)


def test_mixed_adapters_in_one_batch_equal_peft(client, real_base, real_tokenizer, real_adapter_sources):
    """Two adapters (different ranks and targets) and the base at once, each equal plain PEFT's greedy."""
    assert_mixed_batch_equals_peft(client, real_base.path, real_tokenizer, real_adapter_sources)


def test_the_startup_parity_probe_passed_on_the_embedded_base(vllm_server):
    """vLLM's prompt logprobs and greedy steps on the probe tokens equal transformers' before /ready."""
    assert "parity probe: vLLM's logprobs equal transformers' on llama" in vllm_server.log()


def test_streaming_joins_to_the_same_text_with_usage(client):
    full = ask(client, QUESTIONS[1], max_tokens=24)
    stream = ask(client, QUESTIONS[1], max_tokens=24, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens > 0


def test_echo_scoring_equals_the_models_own_logprobs(client, real_base, real_tokenizer):
    """lm-eval's loglikelihood request: echo + logprobs + max_tokens 0, scored by vLLM's prefill."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt = "The capital of France is Paris"
    scored = client.completions.create(model=BASE, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == prompt and scored.usage.completion_tokens == 0
    ids = real_tokenizer(prompt)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(real_base.path, dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    expected = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    got = choice.logprobs.token_logprobs
    assert got[0] is None and got[1:] == pytest.approx(expected, abs=1e-3)


def test_structured_output_is_valid_against_the_schema(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    answer = ask(
        client,
        "Give the city and population of Paris as JSON.",
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    document = json.loads(answer.choices[0].message.content)
    assert set(document) == {"city", "population"} and isinstance(document["population"], int)
    assert answer.choices[0].finish_reason == "stop"


def test_new_version_is_served_without_restart_and_pins_hold(
    client, real_volume, real_adapter_sources, real_base, real_tokenizer
):
    before = ask(client, QUESTIONS[0], model="qv8").choices[0].message.content
    version = publish_folder(
        AdapterVolume(real_volume),
        "qv8",
        real_adapter_sources / "qv8-v2",
        real_base.fingerprint,
        real_base.model_id,
    )
    pinned = ask(client, QUESTIONS[0], extra_body={"adapter": f"qv8@v{version}"})
    assert pinned.model == f"qv8@v{version}"
    new = pinned.choices[0].message.content
    assert new == peft_reference(
        real_base.path, real_adapter_sources / "qv8-v2", real_tokenizer, QUESTIONS[0], 16
    )
    assert new != before, "the new version must answer differently for this test to mean anything"
    deadline = time.monotonic() + 10
    while ask(client, QUESTIONS[0], model="qv8").choices[0].message.content != new:
        assert time.monotonic() < deadline, "LATEST not picked up within 10 s"
        time.sleep(0.3)
    assert ask(client, QUESTIONS[0], extra_body={"adapter": "qv8@v1"}).choices[0].message.content == before


def test_canary_routes_users_to_both_versions_each_answering_as_its_pin(client, real_volume):
    volume = AdapterVolume(real_volume)
    volume.promote("qv8", 1)
    volume.canary("qv8", 2, 50)
    pinned = {v: ask(client, QUESTIONS[0], model=f"qv8@v{v}").choices[0].message.content for v in (1, 2)}
    time.sleep(1.0)  # the watcher's poll (0.3 s) picks up the split
    served: dict[str, str] = {}
    for user in range(12):
        answer = ask(client, QUESTIONS[0], model="qv8", user=f"user-{user}")
        served[answer.model] = answer.choices[0].message.content
    assert set(served) == {"qv8@v1", "qv8@v2"}
    assert served == {f"qv8@v{v}": text for v, text in pinned.items()}
    volume.promote("qv8", 2)


def test_prefix_cache_is_never_stale_after_an_in_place_rewrite(
    client, vllm_server, real_volume, real_adapter_sources, real_base, real_tokenizer
):
    """A plain folder rewritten in place: the next request must see the new weights, not KV the old
    ones computed for the same prompt (vLLM keys its cache by the LoRA's name: ours is per load).
    The prompt spans more than one of vLLM's CPU KV blocks (128 tokens): only full blocks are cached."""
    question = "Items: " + ", ".join(f"item {i}" for i in range(60)) + ". " + QUESTIONS[2]
    folder = real_volume / "inplace"
    shutil.copytree(real_adapter_sources / "qv8", folder)
    time.sleep(1.0)
    first = ask(client, question, model="inplace")
    again = ask(client, question, model="inplace")
    assert again.usage.prompt_tokens_details.cached_tokens > 0, "the second request must hit the cache"
    assert again.choices[0].message.content == first.choices[0].message.content
    for file in (real_adapter_sources / "qv8-v2").iterdir():
        staged = folder / (file.name + ".new")
        shutil.copyfile(file, staged)
        staged.replace(folder / file.name)
    rewritten = ask(client, QUESTIONS[2], model="inplace").choices[0].message.content
    expected = peft_reference(
        real_base.path, real_adapter_sources / "qv8-v2", real_tokenizer, QUESTIONS[2], 16
    )
    assert rewritten == expected
    metrics = httpx.get(vllm_server.base_url + "/metrics").text
    assert (
        metric_value(metrics, "lorayard_prefix_cache_hit_tokens_total", adapter="inplace", version="plain")
        > 0
    )


def test_tool_calls_and_their_round_trips_equal_the_native_engines(client, tmp_path):
    """The same greedy tool-calling requests to both engines (tool_choice auto, required and named,
    whole and streamed; a tool's result sent back; the Responses API's call and its second turn by
    previous_response_id): the same calls, arguments, text and finish reasons from each."""
    (tmp_path / "adapters").mkdir()
    native = start_server(["--adapters-dir", str(tmp_path / "adapters")], tmp_path / "native.log")
    try:
        native_client = openai.OpenAI(base_url=native.v1, api_key="unused", max_retries=0, timeout=300)
        expected = _tool_transcript(native_client)
    finally:
        native.stop()
    got = _tool_transcript(client)
    assert got == expected
    assert any(turn[0] == "tool_calls" for turn in got), "some turn must call the tool to mean anything"


TOOL_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_RESULT = [
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


def _tool_transcript(client: openai.OpenAI) -> list[tuple]:
    """Each turn's (finish reason or status, text, [(tool, arguments)]), ids left out (they are random)."""
    turns: list[tuple] = []
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("auto", "required", named):
        answer = client.chat.completions.create(
            model=BASE,
            messages=TOOL_ASK,
            tools=WEATHER_TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=60,
        ).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in answer.message.tool_calls or []]
        turns.append((answer.finish_reason, answer.message.content, calls))
    turns.append(_streamed_call(client, named))
    answer = client.chat.completions.create(
        model=BASE, messages=[*TOOL_ASK, *TOOL_RESULT], tools=WEATHER_TOOLS, temperature=0, max_tokens=24
    ).choices[0]
    turns.append((answer.finish_reason, answer.message.content, []))
    tool = {"type": "function", **WEATHER_TOOLS[0]["function"]}
    called = client.responses.create(
        model=BASE,
        input=TOOL_ASK[0]["content"],
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=60,
    )
    [call] = called.output
    turns.append((called.status, None, [(call.name, call.arguments)]))
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature_c": 18}'}
    second = client.responses.create(
        model=BASE,
        previous_response_id=called.id,
        input=[result],
        tools=[tool],
        temperature=0,
        max_output_tokens=24,
    )
    calls = [(item.name, item.arguments) for item in second.output if item.type == "function_call"]
    turns.append((second.status, second.output_text, calls))
    return turns


def _streamed_call(client: openai.OpenAI, tool_choice: object) -> tuple:
    """A streamed tool-calling answer put together as a client does: calls by index, the finish reason."""
    calls: dict[int, list[str]] = {}
    finish = None
    stream = client.chat.completions.create(
        model=BASE,
        messages=TOOL_ASK,
        tools=WEATHER_TOOLS,
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, ["", ""])
                entry[0] += (call.function and call.function.name) or ""
                entry[1] += (call.function and call.function.arguments) or ""
            finish = choice.finish_reason or finish
    return (finish, None, [tuple(calls[i]) for i in sorted(calls)])


def test_drain_finishes_the_stream_in_flight_then_refuses(vllm_server):
    """SIGTERM: the stream running finishes whole, new requests get 503, the server exits 0. Last: it
    stops the module's server."""
    chunks: list[str] = []

    def stream() -> None:
        body = {
            "model": BASE,
            "prompt": "Count: 1, 2, 3,",
            "max_tokens": 48,
            "temperature": 0,
            "stream": True,
        }
        body["ignore_eos"] = True
        with httpx.stream("POST", vllm_server.v1 + "/completions", json=body, timeout=300) as response:
            chunks.extend(line for line in response.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.monotonic() + 60
    while not chunks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chunks, "the stream never started"
    vllm_server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(
        vllm_server.v1 + "/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1}
    )
    assert refused.status_code == 503
    reader.join(timeout=300)
    assert chunks[-1] == "data: [DONE]"
    finishes = [
        json.loads(c[6:])["choices"][0]["finish_reason"] for c in chunks[:-1] if json.loads(c[6:])["choices"]
    ]
    assert finishes[-1] == "length"
    assert vllm_server.process.wait(timeout=120) == 0


def test_tensor_parallel_2_on_the_cpu_equals_peft_and_a_dead_engine_stops_the_server(real_base, tmp_path):
    """--tensor-parallel-size 2 on vLLM's CPU build: two worker ranks, one core each. The embedded base
    has 9 attention heads (vLLM needs them divisible by the TP size) and vLLM's CPU attention has no
    kernel for the tiny base's head_dim 16, so a small random Llama with 4 heads of 64 serves here;
    the startup parity probe passes through both ranks on it.
    Then vLLM's engine process is killed with no request in flight: the next /ready answers 503 and the
    server exits non-zero, so an orchestrator restarts it rather than keeping a replica that would
    answer 500 forever (before, only a failing request noticed)."""
    from lorayard.base_model import load_tokenizer, resolve_base_model
    from lorayard.testing.random_adapter import build_random_adapter

    folder = _tiny_vllm_base(real_base.path, tmp_path / "base")
    base = resolve_base_model(str(folder))
    build_random_adapter(
        folder, tmp_path / "qv8", 0, b_scale=0.3, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
    )
    volume = tmp_path / "volume"
    volume.mkdir()
    publish_folder(AdapterVolume(volume), "qv8", tmp_path / "qv8", base.fingerprint, base.model_id)
    server = start_server(
        [
            *("--base-model", str(folder), "--adapters-dir", str(volume), "--engine", "vllm"),
            "--tensor-parallel-size",
            "2",
        ],
        tmp_path / "tp2.log",
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},  # auto would keep both cores for its own processes
        timeout=900,
    )
    try:
        tokenizer = load_tokenizer(base)
        for model, adapter in ((str(folder), None), ("qv8", tmp_path / "qv8")):
            body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 16}
            answer = httpx.post(server.v1 + "/chat/completions", json={**body, "temperature": 0}, timeout=300)
            assert answer.status_code == 200, answer.text
            expected = peft_reference(folder, adapter, tokenizer, QUESTIONS[0], 16)
            assert answer.json()["choices"][0]["message"]["content"] == expected, model
        assert "tensor_parallel_size=2" in server.log()
        assert "parity probe: vLLM's logprobs equal transformers' on llama" in server.log()
        os.kill(_engine_core_pid(server.process.pid), signal.SIGKILL)
        ready = _ready_once_the_engine_is_gone(server.base_url)
        assert ready.status_code == 503 and ready.json()["status"] == "failed", ready.text
        assert "vLLM's engine died" in ready.json()["error"]
        assert server.process.wait(timeout=120) == 1
        assert "vLLM's engine died" in server.log()
    finally:
        server.stop()


def test_a_base_vllm_computes_differently_from_transformers_is_refused_at_startup(real_base, tmp_path):
    """A Llama whose config has ``logit_scale``: vLLM's Llama multiplies its logits by it, transformers'
    ignores it. The parity probe sees the two disagree and the server exits non-zero, naming the
    architecture, the probe position and both logprobs, before it ever reports ready."""
    folder = _tiny_vllm_base(real_base.path, tmp_path / "base", logit_scale=0.5)
    (tmp_path / "adapters").mkdir()
    command = [sys.executable, "-m", "lorayard.server", "--host", "127.0.0.1", "--port", "0", "--engine"]
    command += ["vllm", "--base-model", str(folder), "--adapters-dir", str(tmp_path / "adapters")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "base architecture 'llama': vLLM's forward disagrees with transformers'" in last, last
    assert re.search(r"probe position \d+: token \d+'s logprob is \S+ in vLLM, \S+ in transformers", last)


def _tiny_vllm_base(like: Path, out: Path, **overrides: object) -> Path:
    """A small random Llama vLLM's CPU build serves: 4 heads of 64 (its CPU attention has no kernel for
    the tiny base's head_dim 16; tensor parallel 2 needs the heads divisible by 2)."""
    from lorayard.testing.random_base import TINY, build_random_base

    shape = {**TINY, "hidden_size": 128, "intermediate_size": 256, "head_dim": 64}
    return build_random_base(like, out, {**shape, **overrides})


def _ready_once_the_engine_is_gone(url: str) -> httpx.Response:
    """/ready until it stops answering 200: vLLM's monitor marks the engine dead within moments."""
    deadline = time.monotonic() + 60
    while True:
        response = httpx.get(url + "/ready", timeout=10)
        if response.status_code != 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def _engine_core_pid(server_pid: int) -> int:
    """vLLM's engine-core process among the server's children (it names itself VLLM::EngineCore)."""
    children = Path(f"/proc/{server_pid}/task").glob("*/children")
    for pid in (int(p) for f in children for p in f.read_text().split()):
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::EngineCore"):
            return pid
    raise AssertionError(f"no VLLM::EngineCore child of {server_pid}")
