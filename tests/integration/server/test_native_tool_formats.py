"""Tool calls in a base's own format, served: tiny Mistral (v11+, ``[TOOL_CALLS]`` a special token),
Llama 3.1 (JSON calls, an ``ipython`` tool turn) and Qwen 2.5 (Hermes ``<tool_call>``, the template's
own tools section) bases whose chat templates write the calls, on a real server with the openai
client. Required and named choices give calls valid against the schema, auto is served (and, on
Mistral, made to call by a logit bias on ``[TOOL_CALLS]``), streamed and whole answers agree, the
trigger never reaches ``content``, and a tool result goes back."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from lorayard.chat_format import stop_token_ids

from .conftest import WEATHER, WEATHER_TOOLS, start_server

TOOLS = WEATHER_TOOLS
ASK = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
TRIGGERS = {"mistral": "[TOOL_CALLS]", "llama3": '{"name": ', "qwen": "<tool_call>"}


@pytest.fixture(scope="module", params=["mistral", "llama3", "qwen"])
def served(request, tool_family_base, tmp_path_factory):
    """(family, openai client, model id, server) for a server on that family's tiny base."""
    family = request.param
    base = tool_family_base(family)
    adapters = tmp_path_factory.mktemp(f"{family}-adapters")
    server = start_server(
        ["--base-model", str(base), "--adapters-dir", str(adapters)],
        tmp_path_factory.mktemp("logs") / f"tools-{family}.log",
    )
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    yield family, client, client.models.list().data[0].id, server
    server.stop()


def _stream(client, **body):
    """The streamed answer joined as a client does: content deltas, calls by index, finish reason."""
    deltas, calls, finish = [], {}, None
    for chunk in client.chat.completions.create(stream=True, **body):
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": None, "arguments": ""})
                entry["name"] = (call.function and call.function.name) or entry["name"]
                entry["arguments"] += (call.function and call.function.arguments) or ""
            finish = choice.finish_reason or finish
    return deltas, [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)], finish


def _check(family, client, *, expect_call: bool, **body):
    """The whole answer and its streamed twin agree; calls are valid; no trigger in content."""
    whole = client.chat.completions.create(**body).choices[0]
    deltas, calls, finish = _stream(client, **body)
    content = whole.message.content or ""
    assert finish == whole.finish_reason and "".join(deltas) == content
    assert all(TRIGGERS[family] not in d for d in deltas) and TRIGGERS[family] not in content
    whole_calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert calls == whole_calls
    if expect_call:
        assert whole_calls and whole.finish_reason == "tool_calls" and content == ""
    for name, arguments in whole_calls:
        assert name == "get_weather"
        jsonschema.validate(json.loads(arguments), WEATHER)
    return whole


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_required_and_named_calls_are_valid_whole_and_streamed(served, choice):
    family, client, model, _ = served
    _check(
        family,
        client,
        expect_call=True,
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )


def test_auto_answers_text_or_valid_calls(served):
    """Auto: the tiny model mostly talks; whatever it does, the answer is well formed. On Mistral the
    ``[TOOL_CALLS]`` special token, biased up, starts a call, and the grammar makes it a valid one."""
    family, client, model, _ = served
    body = dict(model=model, messages=ASK, tools=TOOLS, parallel_tool_calls=False, max_tokens=60)
    _check(family, client, expect_call=False, temperature=0, **body)
    if family == "mistral":
        tokenizer_id = _token_id(served, "[TOOL_CALLS]")
        _check(family, client, expect_call=True, temperature=0, logit_bias={str(tokenizer_id): 100}, **body)


def test_a_tool_result_goes_back_and_tokenize_counts_its_prompt(served):
    """The agent's second turn: the call replayed (null content) and its result, in the template's own
    spelling; /tokenize with the same messages and tools counts the prompt chat fed the model."""
    _, client, model, server = served
    call = (
        client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=80,
        )
        .choices[0]
        .message.tool_calls[0]
    )
    replay = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": call.function.arguments},
    }
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [replay]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"},
    ]
    answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    tokenized = httpx.post(
        server.base_url + "/tokenize", json={"model": model, "messages": messages, "tools": TOOLS}, timeout=60
    ).json()
    assert tokenized["count"] == answer.usage.prompt_tokens


def _token_id(served, token: str) -> int:
    _, _, model, server = served
    response = httpx.post(
        server.base_url + "/tokenize",
        json={"model": model, "prompt": token, "add_special_tokens": False},
        timeout=60,
    )
    (token_id,) = response.json()["tokens"]
    return int(token_id)


def test_every_end_of_turn_token_stops_generation(served, tool_family_base):
    """The tokens that end a turn (the EOS, and ChatML's / Llama 3's where the vocabulary has them:
    Llama 3.1's ``<|eom_id|>`` after a built-in tool call) end the answer at once: none runs on."""
    family, client, model, _ = served
    tokenizer = AutoTokenizer.from_pretrained(tool_family_base(family))
    ends = stop_token_ids(tokenizer)
    if family == "llama3":
        assert tokenizer.convert_tokens_to_ids("<|eom_id|>") in ends
    for token_id in sorted(ends):
        answer = client.chat.completions.create(
            model=model, messages=ASK, max_tokens=8, temperature=0, logit_bias={str(token_id): 100}
        )
        assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens == 1
