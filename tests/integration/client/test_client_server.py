"""The client against the real server on 127.0.0.1 (real model, random PEFT adapters)."""

from __future__ import annotations

import asyncio

import openai
import pytest
from lorayard.client import (
    AsyncLorayardClient,
    BadRequestError,
    LorayardClient,
    NotFoundError,
    RetryPolicy,
    UnauthorizedError,
)

QUESTION = [{"role": "user", "content": "Name a colour."}]
GREEDY = {"max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def client(server):
    with LorayardClient(server.base_url, api_key=server.api_key) as client:
        yield client


def test_sync_chat_matches_the_official_openai_client(client, server):
    result = client.chat(QUESTION, adapter="alpha", **GREEDY)
    assert result.text and result.finish_reason in {"stop", "length"}
    assert result.adapter == "alpha"
    assert 1 <= result.usage.completion_tokens <= 8 and result.usage.prompt_tokens > 0
    reference = openai.OpenAI(base_url=server.base_url, api_key=server.api_key).chat.completions.create(
        model="alpha", messages=QUESTION, **GREEDY
    )
    assert result.text == reference.choices[0].message.content
    assert result.usage.completion_tokens == reference.usage.completion_tokens


def test_adapters_change_the_answer_and_async_twin_agrees(client, server):
    sync_answers = {
        name: client.chat(QUESTION, adapter=name, **GREEDY).text for name in ("alpha", "beta", None)
    }
    assert len(set(sync_answers.values())) == 3  # random adapters really steer the base

    async def run():
        async with AsyncLorayardClient(server.base_url, api_key=server.api_key) as aclient:
            results = await asyncio.gather(
                *(aclient.chat(QUESTION, adapter=name, **GREEDY) for name in sync_answers)
            )
            return {name: r.text for name, r in zip(sync_answers, results, strict=True)}

    assert asyncio.run(run()) == sync_answers


def test_streaming_equals_the_whole_answer(client, server):
    whole = client.chat(QUESTION, adapter="beta", **GREEDY)
    stream = client.chat_stream(QUESTION, adapter="beta", **GREEDY)
    deltas = list(stream)
    assert "".join(deltas) == whole.text
    assert stream.usage == whole.usage and stream.finish_reason == whole.finish_reason

    completion = client.complete("The capital of France is", adapter="alpha", **GREEDY)
    streamed = client.complete_stream("The capital of France is", adapter="alpha", **GREEDY)
    assert "".join(streamed) == completion.text
    assert streamed.usage.completion_tokens == completion.usage.completion_tokens

    async def run():
        async with AsyncLorayardClient(server.base_url, api_key=server.api_key) as aclient:
            astream = aclient.chat_stream(QUESTION, adapter="beta", **GREEDY)
            return "".join([d async for d in astream]), astream.usage

    assert asyncio.run(run()) == (whole.text, whole.usage)


def test_models_lists_base_and_adapters(client):
    models = client.models()
    bases = [m for m in models if not m.is_adapter]
    adapters = {m.id: m for m in models if m.is_adapter}
    assert len(bases) == 1
    assert {"alpha", "beta"} <= set(adapters)
    assert adapters["alpha"].parent == bases[0].id
    assert client.health() is True and client.ready() is True


def test_unload_and_load_round_trip(client):
    client.chat(QUESTION, adapter="alpha", **GREEDY)  # make sure it is resident
    client.unload_adapter("alpha")
    with pytest.raises(NotFoundError):
        client.unload_adapter("alpha")
    client.load_adapter("alpha")
    assert client.chat(QUESTION, adapter="alpha", **GREEDY).text


def test_errors_are_typed(client, server):
    with pytest.raises(NotFoundError) as caught:
        client.chat(QUESTION, adapter="no-such-adapter", **GREEDY)
    assert caught.value.status_code == 404 and "no-such-adapter" in caught.value.message
    assert caught.value.type

    with pytest.raises(BadRequestError) as caught:
        client.chat(QUESTION, adapter="../escape", **GREEDY)
    assert caught.value.status_code == 400

    with pytest.raises(BadRequestError):
        client.load_adapter("evil", "/etc")

    no_retry = RetryPolicy(max_attempts=1)
    with (
        LorayardClient(server.base_url, api_key="wrong", retry=no_retry) as wrong,
        pytest.raises(UnauthorizedError),
    ):
        wrong.chat(QUESTION, **GREEDY)
    with (
        LorayardClient(server.base_url, api_key="", retry=no_retry) as anonymous,
        pytest.raises(UnauthorizedError),
    ):
        anonymous.models()
