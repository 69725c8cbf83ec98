"""/v1/responses against the real server and model, through the official openai client's own
``client.responses`` (its types parse every answer and event): served as chat, so each answer equals
the chat answer to the same conversation."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from lorayard.testing.server import metric_value

BASE = "smollm2-135m-instruct"
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string", "maxLength": 24}},
        "required": ["location"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=real_server.v1, api_key="key-a", max_retries=0, timeout=120)


def _chat_answer(client, messages, max_tokens, **extra):
    return client.chat.completions.create(
        model=extra.pop("model", BASE), messages=messages, temperature=0, max_tokens=max_tokens, **extra
    )


def test_text_input_equals_the_chat_answer(client):
    response = client.responses.create(
        model=BASE, input="What is the capital of France?", temperature=0, max_output_tokens=12
    )
    chat = _chat_answer(client, [{"role": "user", "content": "What is the capital of France?"}], 12)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    expected = "incomplete" if chat.choices[0].finish_reason == "length" else "completed"
    assert response.status == expected
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == expected


def test_json_object_text_format_and_sampling_fields_are_chats(client):
    """``text.format: json_object`` is chat's json_object grammar; ``temperature``, ``top_p`` and a
    ``seed`` sampled as chat samples them: the same answer, and it parses as an object."""
    sampling = {"temperature": 0.9, "top_p": 0.8}
    question = "Describe Paris as JSON."
    response = client.responses.create(
        model=BASE,
        input=question,
        text={"format": {"type": "json_object"}},
        max_output_tokens=40,
        extra_body={"seed": 5},
        **sampling,
    )
    chat = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": question}],
        response_format={"type": "json_object"},
        max_tokens=40,
        seed=5,
        **sampling,
    )
    assert response.output_text == chat.choices[0].message.content
    assert (response.temperature, response.top_p) == (0.9, 0.8)
    if response.status == "completed":
        assert isinstance(json.loads(response.output_text), dict)


def test_instructions_items_and_an_adapter_version(client):
    """``instructions`` is the system turn, items are the turns, ``model`` picks the adapter version."""
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Hi, I am Ada."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada!"}]},
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": "What is my name?"},
    ]
    response = client.responses.create(
        model="qv8@v1", instructions="You are terse.", input=items, temperature=0, max_output_tokens=8
    )
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi, I am Ada."},
        {"role": "assistant", "content": "Hello Ada!"},
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is my name?"},
    ]
    chat = _chat_answer(client, messages, 8, model="qv8@v1")
    assert response.model == "qv8@v1" and response.instructions == "You are terse."
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_stream_events_in_order_and_equal_to_the_whole_answer(client):
    kwargs = {"model": BASE, "input": "Name three colors.", "temperature": 0, "max_output_tokens": 64}
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [event.type for event in events]
    final = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final,
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    # The SDK's own stream helper accumulates the events into the same response (it needs
    # response.completed: the answer ends before max_output_tokens).
    assert whole.status == "completed"
    with client.responses.stream(**kwargs) as stream:
        assert stream.get_final_response().output_text == whole.output_text


def test_json_schema_text_format_always_validates(client):
    response = client.responses.create(
        model=BASE,
        input="Tell me about Paris.",
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
        temperature=1.0,
        max_output_tokens=200,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), CITY)

    class City(BaseModel):
        city: str
        population: int

    parsed = client.responses.parse(
        model=BASE, input="Tell me about Oslo.", text_format=City, temperature=1.0, max_output_tokens=200
    )
    assert isinstance(parsed.output_parsed, City)


def test_previous_response_id_continues_the_conversation(client, real_server):
    first = client.responses.create(
        model=BASE, instructions="Be brief.", input="My name is Ada.", temperature=0, max_output_tokens=8
    )
    second = client.responses.create(
        model=BASE,
        previous_response_id=first.id,
        input="What is my name?",
        temperature=0,
        max_output_tokens=8,
    )
    # Instructions are not carried over (as on OpenAI): the conversation is the turns alone.
    messages = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    chat = _chat_answer(client, messages, 8)
    assert second.previous_response_id == first.id
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    counted = httpx.post(real_server.base_url + "/tokenize", json={"messages": messages}, timeout=30).json()
    assert counted["count"] == second.usage.input_tokens


def test_get_delete_and_the_api_key_scope(client, real_server):
    made = client.responses.create(model=BASE, input="Hello", temperature=0, max_output_tokens=4)
    fetched = client.responses.retrieve(made.id)
    assert fetched.id == made.id and fetched.output_text == made.output_text

    other = openai.OpenAI(base_url=real_server.v1, api_key="key-b", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(made.id)
    with pytest.raises(openai.BadRequestError) as refused:
        other.responses.create(model=BASE, previous_response_id=made.id, input="Hi", max_output_tokens=4)
    assert refused.value.body["param"] == "previous_response_id"

    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)

    unstored = client.responses.create(model=BASE, input="Hello", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_input_items_are_listed_paged_and_scoped_to_the_key(client, real_server):
    """``client.responses.input_items.list``: the request's own input as OpenAI's items (ids kept when
    sent), newest first by default, paged by ``limit`` and ``after`` (the client follows the cursor)."""
    items = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": "{}",
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "rain"},
        {"role": "assistant", "content": "It rains."},
    ]
    made = client.responses.create(model=BASE, input=items, tools=[WEATHER_TOOL], max_output_tokens=4)
    newest_first = client.responses.input_items.list(made.id)
    assert newest_first.object == "list" and not newest_first.has_more
    kinds = [(item.type, getattr(item, "role", None)) for item in newest_first.data]
    assert kinds == [
        ("message", "assistant"),
        ("function_call_output", None),
        ("function_call", None),
        ("message", "user"),
        ("message", "developer"),
    ]
    assert newest_first.data[2].id == "fc_1" and newest_first.data[1].output == "rain"
    assert newest_first.data[3].content[0].type == "input_text"
    assert newest_first.data[0].content[0].text == "It rains."
    assert (newest_first.first_id, newest_first.last_id) == (
        newest_first.data[0].id,
        newest_first.data[-1].id,
    )

    first_page = client.responses.input_items.list(made.id, order="asc", limit=2)
    assert first_page.has_more and [i.id for i in first_page.data] == [
        i.id for i in newest_first.data[:-3:-1]
    ]
    every = list(client.responses.input_items.list(made.id, order="asc", limit=2))  # follows ``after``
    assert [i.id for i in every] == [i.id for i in reversed(newest_first.data)]

    one = client.responses.create(model=BASE, input="Hello", max_output_tokens=2)
    (message,) = client.responses.input_items.list(one.id).data
    assert (message.role, message.content[0].text) == ("user", "Hello")
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.input_items.list(made.id, after="msg_nope")
    assert bad.value.body["param"] == "after"
    other = openai.OpenAI(base_url=real_server.v1, api_key="key-b", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        other.responses.input_items.list(made.id)


def test_logprobs_when_included_equal_chats(client):
    kwargs = {"model": "qv8", "input": "Name a fruit.", "temperature": 0, "max_output_tokens": 6}
    include = ["message.output_text.logprobs"]
    response = client.responses.create(include=include, top_logprobs=2, **kwargs)
    chat = client.chat.completions.create(
        model="qv8",
        messages=[{"role": "user", "content": "Name a fruit."}],
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
    )
    [part] = response.output[0].content
    # equal up to float noise: a prefix-cache hit or another batch shape sums in another order
    reference = chat.choices[0].logprobs.content
    assert [e.token for e in part.logprobs] == [e.token for e in reference]
    assert [e.logprob for e in part.logprobs] == pytest.approx([e.logprob for e in reference], abs=1e-3)
    assert len(part.logprobs) == response.usage.output_tokens and all(
        len(e.top_logprobs) == 2 for e in part.logprobs
    )
    assert "".join(e.token for e in part.logprobs) == part.text
    events = list(client.responses.create(include=include, top_logprobs=2, stream=True, **kwargs))
    streamed = [e for event in events if event.type == "response.output_text.delta" for e in event.logprobs]
    assert [e.token for e in streamed] == [e.token for e in part.logprobs]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in part.logprobs], abs=1e-3)
    # not asked for: none
    assert client.responses.create(**kwargs).output[0].content[0].logprobs == []


def test_max_output_tokens_cut_is_incomplete(client):
    response = client.responses.create(
        model=BASE, input="Write a long story about a dragon.", temperature=0, max_output_tokens=3
    )
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


def test_forced_function_call_is_a_function_call_item(client):
    response = client.responses.create(
        model=BASE,
        input="What is the weather in Oslo?",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=1.0,
        max_output_tokens=100,
    )
    [call] = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["parameters"])
    assert response.tools[0].name == "get_weather"

    events = list(
        client.responses.create(
            model=BASE,
            input="What is the weather in Oslo?",
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
            temperature=1.0,
            max_output_tokens=100,
            stream=True,
        )
    )
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == deltas and done.name == "get_weather"
    jsonschema.validate(json.loads(deltas), WEATHER_TOOL["parameters"])


@pytest.mark.parametrize(
    ("extra", "param", "status"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0.type", 400),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}
                ]
            },
            "input.0.content.0.type",  # chat's refusal on a text-only base
            400,
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type", 400),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id", 400),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 3}}}},
            "text.format.schema",
            400,
        ),
        ({"text": {"format": {"type": "json_schema", "schema": CITY}}}, "text.format.name", 400),
        (
            {
                "tools": [{"type": "function", "name": "f", "parameters": {"type": "nonsense"}}],
                "tool_choice": "required",
            },
            "tools.0.parameters",
            400,
        ),
        (
            {"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER_TOOL]},
            "tool_choice.name",
            400,
        ),
        ({"max_output_tokens": 100_000}, "max_output_tokens", 400),
        ({"max_tokens": 5}, "max_tokens", 400),
        ({"background": True}, "background", 400),
        ({"conversation": "conv_1"}, "conversation", 400),
        ({"reasoning": {"effort": "high"}}, "reasoning", 400),
        ({"truncation": "auto"}, "truncation", 400),
        ({"min_p": 0.1}, "min_p", 400),
        ({"include": ["file_search_call.results"]}, "include", 400),
        ({"previous_response_id": "resp_nope"}, "previous_response_id", 400),
        ({"model": "no-such-adapter"}, "model", 404),
        ({"temperature": 3}, "temperature", 400),
        ({"temperature": 1.7e-273}, "temperature", 400),  # schemathesis's find: once a NaN row, a 500
    ],
)
def test_what_we_cannot_do_is_refused_naming_the_field(real_server, extra, param, status):
    body = {"model": BASE, "input": "Hi", "max_output_tokens": 4, **extra}
    response = httpx.post(real_server.v1 + "/responses", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].strip()


def test_refusals_with_their_no_op_values_are_accepted(real_server):
    body = {
        "model": BASE,
        "input": "Hi",
        "max_output_tokens": 2,
        "background": False,
        "truncation": "disabled",
        "include": [],
        "reasoning": {"effort": None},
        "metadata": {"run": "7"},
        "store": False,
    }
    response = httpx.post(real_server.v1 + "/responses", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == {"run": "7"} and response.json()["store"] is False


def test_function_call_round_trip_by_previous_response_id_and_by_items(client):
    """A call, its result sent back as a function_call_output item: the same prompt whether the
    conversation is stored (previous_response_id) or sent whole (the output items replayed)."""
    called = client.responses.create(
        model=BASE,
        input="What is the weather in Oslo?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=60,
    )
    [call] = called.output
    assert call.type == "function_call" and called.status == "completed"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature_c": 21}'}
    stored = client.responses.create(
        model=BASE,
        previous_response_id=called.id,
        input=[result],
        tools=[WEATHER_TOOL],
        temperature=0,
        max_output_tokens=24,
    )
    replayed_items = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        call.model_dump(exclude_none=True),
        result,
    ]
    replayed = client.responses.create(
        model=BASE, input=replayed_items, tools=[WEATHER_TOOL], temperature=0, max_output_tokens=24
    )
    assert stored.usage.input_tokens == replayed.usage.input_tokens
    assert [item.model_dump(exclude={"id", "call_id"}) for item in stored.output] == [
        item.model_dump(exclude={"id", "call_id"}) for item in replayed.output
    ]
    # The tool's result is in the prompt: the chat request with the same turns counts the same tokens.
    chat = client.chat.completions.create(
        model=BASE,
        messages=[
            {"role": "user", "content": "What is the weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": '{"temperature_c": 21}'},
        ],
        tools=[
            {
                "type": "function",
                "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters", "strict")},
            }
        ],
        temperature=0,
        max_tokens=24,
    )
    assert chat.usage.prompt_tokens == stored.usage.input_tokens


@pytest.mark.parametrize("streamed", [False, True])
def test_openai_agents_default_responses_model_with_a_tool_and_output_type(real_server, streamed):
    """openai-agents' default model (the Responses API) runs its own loop against an adapter: a tool
    (required on the first turn; the SDK then resets tool_choice to auto) and a structured
    ``output_type``, whole and streamed. Too many turns on a 135M model is a model-quality outcome;
    any HTTP error (the SDK raises it) is not."""
    agents = pytest.importorskip("agents")
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # traces would go to api.openai.com
    calls: list[str] = []

    # Bounded strings: a greedy 135M model may otherwise fill max_tokens inside one (JSON stays valid,
    # the grammar sees to that, but the SDK treats a cut answer as a failure).
    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=24)]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny and 21 C in {city}"

    class Forecast(BaseModel):
        city: str = Field(max_length=24)
        summary: str = Field(max_length=60)

    def agent(**changes) -> Agent:
        # one client per event loop: its connections belong to the loop that opened them
        client = openai.AsyncOpenAI(base_url=real_server.v1, api_key="agent-key", max_retries=0, timeout=120)
        settings = ModelSettings(
            temperature=0, max_tokens=200, tool_choice=changes.pop("tool_choice", "required")
        )
        return Agent(
            name="forecaster",
            instructions="Call get_weather, then answer with the city and a short summary.",
            tools=[get_weather],
            output_type=Forecast,
            model=OpenAIResponsesModel(model="qv8", openai_client=client),
            model_settings=settings,
        ).clone(**changes)

    async def run(agent: Agent, max_turns: int):
        if not streamed:
            return await Runner.run(agent, "What is the weather in Oslo?", max_turns=max_turns)
        result = Runner.run_streamed(agent, "What is the weather in Oslo?", max_turns=max_turns)
        async for _ in result.stream_events():  # the SDK parses every Responses event we send
            pass
        return result

    try:
        result = asyncio.run(run(agent(), max_turns=4))
    except agents.MaxTurnsExceeded:
        pass  # the model kept calling the tool: quality, not an API failure
    else:
        assert isinstance(result.final_output, Forecast)
    assert calls and calls[0], "the first turn's required call never reached the tool"

    # Without tools the answer is the output_type, always: text.format's grammar makes it valid.
    plain = agent(tools=[], tool_choice=None, instructions="Answer with the city and a short summary.")
    assert isinstance(asyncio.run(run(plain, max_turns=1)).final_output, Forecast)


def test_responses_are_counted_by_version_and_status(client, real_server):
    def count(**labels):
        text = httpx.get(real_server.base_url + "/metrics", timeout=30).text
        return metric_value(text, "lorayard_requests_total", **labels)

    served = {"adapter": "qv8", "version": "v1", "status": "200"}
    refused = {"adapter": "unresolved", "version": "unresolved", "status": "400"}

    def counts() -> tuple[float, float]:
        return count(**served), count(**refused)

    # The server is shared with earlier tests: a stream their client dropped is counted when the server
    # notices, which may be now. Start from counts that have stopped moving.
    before = _settled(counts)
    # Pinned: other tests on this server may publish qv8's next version.
    response = client.responses.create(model="qv8@v1", input="Hi", max_output_tokens=2)
    assert response.model == "qv8@v1"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="qv8@v1", input="Hi", tools=[{"type": "web_search"}])
    # A request is counted once its answer has gone out, which the client may see first.
    assert _settled(counts) == (before[0] + 1, before[1] + 1)


def _settled(read, quiet_s: float = 1.0, timeout_s: float = 30.0):
    """``read()`` once it has returned the same value for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    value, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return value
    return value


def test_langchain_on_the_responses_api(real_server):
    """LangChain ``use_responses_api=True``: bind_tools, then a ToolMessage round trip, no HTTP error."""
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    def get_weather(location: str) -> str:
        """The weather in a city."""
        return f"sunny in {location}"

    llm = ChatOpenAI(
        base_url=real_server.v1,
        api_key="lc-key",
        model="qv8",
        use_responses_api=True,
        temperature=0,
        max_tokens=60,
    )
    asked = HumanMessage("What is the weather in Oslo?")
    first = llm.bind_tools([get_weather], tool_choice="required").invoke([asked])
    [call] = first.tool_calls[:1]
    assert call["name"] == "get_weather" and isinstance(call["args"], dict)
    result = ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])
    second = llm.bind_tools([get_weather]).invoke([asked, first, result])
    assert second.content is not None


def test_pydantic_ai_responses_model_with_a_tool_and_output_type(real_server):
    """pydantic-ai's ``OpenAIResponsesModel``: a tool plus ``output_type`` (its ``final_result`` tool,
    tool_choice required) on the base. (On the random qv8 adapter the model calls get_weather until
    the conversation outgrows the 2,048-token window: a 400 context_length_exceeded, model quality.)"""
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    class Forecast(BaseModel):
        city: str = Field(max_length=24)
        summary: str = Field(max_length=60)

    def get_weather(location: str) -> str:
        """The weather in a city."""
        return f"sunny in {location}"

    model = OpenAIResponsesModel(BASE, provider=OpenAIProvider(base_url=real_server.v1, api_key="pa-key"))
    agent = pydantic_ai.Agent(
        model, output_type=Forecast, model_settings={"temperature": 0, "max_tokens": 200}
    )
    agent.tool_plain(get_weather)
    assert isinstance(agent.run_sync("What is the weather in Oslo?").output, Forecast)
