"""The real server, real model, official openai client: what users do."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from lorayard.testing.server import metric_value
from lorayard.volume import AdapterVolume

from .conftest import BASE, QUESTIONS, ask, assert_mixed_batch_equals_peft, publish_folder


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=real_server.v1, api_key="unused", max_retries=0, timeout=120)


def test_greedy_parity_with_peft_for_concurrent_mixed_adapters(
    client, real_base, real_tokenizer, real_volume, real_adapter_sources
):
    """Requests for two adapters (different ranks and targets) and the base, at once, each equal PEFT."""
    assert_mixed_batch_equals_peft(client, real_base.path, real_tokenizer, real_adapter_sources)


def test_adapter_by_model_field_and_by_adapter_field_agree(client):
    by_model = ask(client, QUESTIONS[2], model="qv8")
    by_field = ask(client, QUESTIONS[2], extra_body={"adapter": "qv8@v1"})
    assert by_model.choices[0].message.content == by_field.choices[0].message.content
    assert by_model.usage.completion_tokens == by_field.usage.completion_tokens > 0
    assert by_model.usage.total_tokens == by_model.usage.prompt_tokens + by_model.usage.completion_tokens


def test_streaming_joins_to_the_same_text_with_usage(client):
    full = ask(client, "用中文说你好，然后加一个表情符号", max_tokens=24)
    stream = ask(
        client,
        "用中文说你好，然后加一个表情符号",
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert all("\ufffd" not in d for d in deltas), "a multi-byte character was split across chunks"
    assert "".join(deltas) == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_stop_strings_and_n(client):
    plain = client.completions.create(model=BASE, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = plain.choices[0].text
    assert text, "the base should continue the sequence"
    stop = text.strip()[:2]
    stopped = client.completions.create(
        model=BASE, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop]
    )
    assert stop not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"
    sampled = client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=8, n=3, seed=7)
    again = client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=8, n=3, seed=7)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    assert len(sampled.choices) == 3 and sampled.usage.completion_tokens == 24


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert BASE in models
    assert {"qv8", "all16"} <= set(models)
    assert models["qv8"].model_extra["parent"] == BASE
    assert models["qv8"].model_extra["latest"] == "v1" or models["qv8"].model_extra["latest"].startswith("v")


def test_new_version_is_served_without_restart(
    client, real_server, real_volume, real_adapter_sources, real_base
):
    before = ask(client, QUESTIONS[0], model="qv8").choices[0].message.content
    version = publish_folder(
        AdapterVolume(real_volume),
        "qv8",
        real_adapter_sources / "qv8-v2",
        real_base.fingerprint,
        real_base.model_id,
    )
    pinned_new = (
        ask(client, QUESTIONS[0], extra_body={"adapter": f"qv8@v{version}"}).choices[0].message.content
    )
    assert pinned_new != before, "the new version must answer differently for this test to mean anything"
    deadline = time.monotonic() + 5
    while ask(client, QUESTIONS[0], model="qv8").choices[0].message.content != pinned_new:
        assert time.monotonic() < deadline, "LATEST not picked up within 5 s"
        time.sleep(0.2)
    assert ask(client, QUESTIONS[0], extra_body={"adapter": "qv8@v1"}).choices[0].message.content == before


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 1000}, 400, "n"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
        ({"messages": "hi"}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "adapter": "../../etc"}, 400, "adapter"),
        ({"messages": [{"role": "user", "content": "hi"}], "adapter": "missing"}, 404, "adapter"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(real_server, body, status, param):
    response = httpx.post(real_server.v1 + "/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"] and error["type"]


def test_invalid_json_and_utf8_are_400(real_server):
    for raw in (b"{not json", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'):
        response = httpx.post(
            real_server.v1 + "/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert "error" in response.json()


def test_metrics_are_per_adapter(client, real_server):
    ask(client, QUESTIONS[1], model="all16")
    text = httpx.get(real_server.base_url + "/metrics").text
    assert 'lorayard_time_to_first_token_seconds_count{adapter="all16",version="plain"}' in text
    assert 'lorayard_requests_total{adapter="all16",status="200",version="plain"}' in text
    # Refusals count too, by status, without the made-up names clients send.
    for body in ({"model": "no-such-model"}, {"temperature": -1}):
        httpx.post(
            real_server.v1 + "/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], **body},
        )
    text = httpx.get(real_server.base_url + "/metrics").text
    assert 'lorayard_requests_total{adapter="unresolved",status="400",version="unresolved"}' in text
    assert 'lorayard_requests_total{adapter="unresolved",status="404",version="unresolved"}' in text
    assert "no-such-model" not in text
    assert "lorayard_loaded_adapters" in text


def test_the_chat_templates_system_prompt_is_served_from_the_prefix_cache(client, real_server):
    """SmolLM2's template puts the same default system prompt before every chat: a second chat on the
    same adapter reuses its KV (openai's usage.prompt_tokens_details.cached_tokens), answers exactly
    as the first did, and the hit is counted per adapter version."""
    metrics = real_server.base_url + "/metrics"
    hits = {"adapter": "all16", "version": "plain"}
    before = metric_value(httpx.get(metrics).text, "lorayard_prefix_cache_hit_tokens_total", **hits)
    first = ask(client, QUESTIONS[2], model="all16")
    again = ask(client, QUESTIONS[2], model="all16")
    assert again.choices[0].message.content == first.choices[0].message.content
    details = again.usage.prompt_tokens_details
    assert details is not None and 0 < details.cached_tokens < again.usage.prompt_tokens
    assert details.cached_tokens % 16 == 0
    after = metric_value(httpx.get(metrics).text, "lorayard_prefix_cache_hit_tokens_total", **hits)
    assert after - before >= details.cached_tokens
