"""Tool calling over HTTP with the real openai client: an agent's round trip (auto choice, a call, its
result sent back), streamed and whole answers alike, calls cut by max_tokens, and the messages agents
send (developer role, null content, text parts; images refused by field)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from .conftest import BASE, WEATHER, WEATHER_TOOLS

TOOLS = WEATHER_TOOLS
ASK = [
    {"role": "developer", "content": "You call tools when they help."},
    {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]},
]


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=real_server.v1, api_key="unused", max_retries=0, timeout=120)


def _joined_stream(client, **body):
    """The streamed answer put together as a client does: content, calls by index, the finish reason;
    and every content delta, to check none carries the trigger."""
    content, deltas, calls, finish = "", [], {}, None
    for chunk in client.chat.completions.create(stream=True, **body):
        for choice in chunk.choices:
            if choice.delta.content:
                content += choice.delta.content
                deltas.append(choice.delta.content)
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] = (call.function and call.function.name) or entry["name"]
                entry["arguments"] += (call.function and call.function.arguments) or ""
            finish = choice.finish_reason or finish
    return content, deltas, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("model", [BASE, "qv8"])
def test_an_agent_round_trip_with_auto_tool_choice(client, model):
    """The loop every framework runs: tools offered (auto), the model calls one or answers; a call's
    result goes back as an assistant turn with null content and a tool turn; the next answer is a 200."""
    messages = list(ASK)
    for seed in range(4):
        response = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, seed=seed, temperature=1.0, max_tokens=64
        )
        message = response.choices[0].message
        if message.tool_calls:
            break
    else:
        # The tiny model answered in text every time: the round trip is then a replayed call.
        message = None
    for call in message.tool_calls if message else []:
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        if response.choices[0].finish_reason == "tool_calls":
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    calls = message.tool_calls if message else None
    replay = [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.function.name, "arguments": c.function.arguments},
        }
        for c in calls or []
    ] or [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": replay},
        *({"role": "tool", "tool_call_id": c["id"], "content": "18 C, sunny"} for c in replay),
    ]
    final = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, seed=0, max_tokens=32)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_stream_and_whole_answer_agree_and_the_trigger_never_leaks(client):
    """Greedy, so both take the same path: required makes it one call, auto leaves it free."""
    for choice in ("auto", "required"):
        body = dict(
            model=BASE,
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=60,
        )
        whole = client.chat.completions.create(**body).choices[0]
        content, deltas, calls, finish = _joined_stream(client, **body)
        assert finish == whole.finish_reason
        assert content == (whole.message.content or "")
        assert all("<tool_call>" not in d for d in deltas) and "<tool_call>" not in content
        expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
        assert [(c["name"], c["arguments"]) for c in calls] == expected
        if choice == "required":
            assert calls and finish == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_cut_by_max_tokens_stays_a_call(client, stream):
    """OpenAI's semantics: finish_reason length, the partial arguments in tool_calls, never in content."""
    body = dict(
        model=BASE,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=14,
    )
    if stream:
        content, _, calls, finish = _joined_stream(client, **body)
        names, arguments = [c["name"] for c in calls], [c["arguments"] for c in calls]
    else:
        choice = client.chat.completions.create(**body).choices[0]
        content, finish = choice.message.content or "", choice.finish_reason
        names = [c.function.name for c in choice.message.tool_calls]
        arguments = [c.function.arguments for c in choice.message.tool_calls]
    assert finish == "length" and content == "" and names == ["get_weather"]
    with pytest.raises(ValueError):
        json.loads(arguments[0])  # cut: not complete JSON, as OpenAI returns it


def test_plain_answers_carry_no_tool_calls_key(real_server):
    body = {"model": BASE, "messages": ASK, "max_tokens": 4, "temperature": 0}
    message = httpx.post(real_server.v1 + "/chat/completions", json=body, timeout=60).json()["choices"][0][
        "message"
    ]
    assert "tool_calls" not in message and isinstance(message["content"], str)


def test_response_format_with_tools_text_obeys_the_schema(client):
    answer = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 40}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": answer}}
    for seed in range(3):
        choice = client.chat.completions.create(
            model=BASE, messages=ASK, tools=TOOLS, response_format=fmt, seed=seed, max_tokens=80
        ).choices[0]
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), answer)
        elif choice.finish_reason == "tool_calls":
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), WEATHER)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_response_format_with_a_forced_tool_is_a_valid_call(client, choice):
    """What openai-agents sends for ``output_type`` + tools: the format is for a text answer, and a
    forced choice answers with the call, valid against its tool."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    answer = client.chat.completions.create(
        model=BASE,
        messages=ASK,
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        response_format=fmt,
        temperature=0,
        max_tokens=60,
    ).choices[0]
    (call,) = answer.message.tool_calls
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_tokenize_with_tools_is_the_chat_prompt(client, real_server):
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": "sunny"},
    ]
    tokenized = httpx.post(
        real_server.base_url + "/tokenize",
        json={"model": BASE, "messages": messages, "tools": TOOLS},
        timeout=60,
    ).json()
    usage = client.chat.completions.create(model=BASE, messages=messages, tools=TOOLS, max_tokens=1).usage
    assert tokenized["count"] == usage.prompt_tokens == len(tokenized["tokens"])


@pytest.mark.parametrize(
    ("message", "param"),
    [
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
            "messages.0.content.0.type",
        ),
        ({"role": "user", "content": None}, "messages.0.content"),
        ({"role": "tool", "content": "x"}, "messages.0.tool_call_id"),
        (
            {
                "role": "user",
                "content": "x",
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            "messages.0.tool_calls",
        ),
        ({"role": "robot", "content": "x"}, "messages.0.role"),
    ],
)
def test_messages_we_cannot_render_are_400_naming_the_field(real_server, message, param):
    body = {"model": BASE, "messages": [message], "max_tokens": 2}
    response = httpx.post(real_server.v1 + "/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_model_card_and_unknown_routes(client, real_server):
    assert client.models.retrieve(BASE).id == BASE
    assert client.models.retrieve("qv8").id == "qv8"
    assert client.models.retrieve("qv8@v1").id == "qv8"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert "nope" in str(info.value)
    response = httpx.post(real_server.v1 + "/no/such/route", json={}, timeout=10)
    error = response.json()["error"]
    assert response.status_code == 404 and "/v1/no/such/route" in error["message"]
    assert "docs/api.md" in error["message"] and error["param"] == "route"
