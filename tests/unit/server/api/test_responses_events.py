"""Chat stream chunks -> Responses events and the final response (what stream and whole both use)."""

from __future__ import annotations

import asyncio

from lorayard.server.api.errors import EngineFailed
from lorayard.server.api.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    FunctionCallDelta,
    ToolCallDelta,
    Usage,
)
from lorayard.server.api.responses_events import ResponseAssembler, response_sse
from lorayard.server.api.responses_protocol import ResponseObject

SKELETON = ResponseObject(id="", created_at=0, status="in_progress", model="m")


def _chunk(delta: ChatDelta | None = None, finish: str | None = None, usage: Usage | None = None):
    choices = [] if delta is None else [ChatChunkChoice(index=0, delta=delta, finish_reason=finish)]
    return ChatCompletionChunk(id="c", created=0, model="m", choices=choices, usage=usage)


def _call(index: int, arguments: str, call_id: str | None = None, name: str | None = None) -> ChatDelta:
    function = FunctionCallDelta(name=name, arguments=arguments)
    return ChatDelta(tool_calls=[ToolCallDelta(index=index, id=call_id, function=function)])


def _events(chunks):
    assembler = ResponseAssembler(SKELETON)
    events = assembler.opening()
    for chunk in chunks:
        events += assembler.add(chunk)
    return assembler, events + assembler.closing()


def test_text_then_two_calls():
    usage = Usage(prompt_tokens=5, completion_tokens=7, total_tokens=12)
    assembler, events = _events(
        [
            _chunk(ChatDelta(role="assistant", content="")),
            _chunk(ChatDelta(content="Let me ")),
            _chunk(ChatDelta(content="check.")),
            _chunk(_call(0, '{"city": ', "call_a", "get_weather")),
            _chunk(_call(0, '"Oslo"}')),
            _chunk(_call(1, "{}", "call_b", "get_time")),
            _chunk(ChatDelta(), finish="tool_calls"),
            _chunk(usage=usage),
        ]
    )
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # the snapshots went out as they were: created has no output, added items are in progress
    assert events[0].response.output == [] and events[2].item.status == "in_progress"
    response = assembler.response
    assert response.status == "completed" and response.output_text() == "Let me check."
    _, first, second = response.output
    assert [first.call_id, first.name, first.arguments] == ["call_a", "get_weather", '{"city": "Oslo"}']
    assert [second.call_id, second.name, second.arguments] == ["call_b", "get_time", "{}"]
    assert all(item.status == "completed" for item in response.output)
    assert [e.output_index for e in events if e.type == "response.output_item.done"] == [0, 1, 2]
    assert response.usage.input_tokens == 5 and response.usage.output_tokens == 7
    assert response.usage.total_tokens == 12 and response.id.startswith("resp_")


def test_a_cut_output_is_incomplete():
    assembler, events = _events(
        [_chunk(ChatDelta(content="Once upon")), _chunk(ChatDelta(), finish="length")]
    )
    assert events[-1].type == "response.incomplete"
    assert assembler.response.status == "incomplete"
    assert assembler.response.incomplete_details.reason == "max_output_tokens"
    assert assembler.response.output[0].status == "incomplete"


def test_an_empty_output_is_one_empty_message():
    assembler, events = _events([_chunk(ChatDelta(content="")), _chunk(ChatDelta(), finish="stop")])
    assert [item.type for item in assembler.response.output] == ["message"]
    assert assembler.response.output_text() == "" and events[-1].type == "response.completed"


def test_a_failure_mid_stream_is_an_error_event_and_response_failed():
    async def chunks():
        yield _chunk(ChatDelta(content="Hel"))
        raise EngineFailed("row failed")

    stored, errors = [], []

    async def frames():
        return [f async for f in response_sse(ResponseAssembler(SKELETON), chunks(), errors, stored.append)]

    sent = asyncio.run(frames())
    kinds = [frame.split("\n", 1)[0] for frame in sent]
    assert kinds[-2:] == ["event: error", "event: response.failed"]
    assert '"status":"failed"' in sent[-1] and '"code":"server_error"' in sent[-1]
    assert errors == [500] and stored == []  # a failed response is not stored
