"""Responses input items -> chat messages, and chat's error fields -> the Responses fields."""

from __future__ import annotations

import pytest

from lorayard.server.api.errors import APIError
from lorayard.server.api.responses_protocol import FunctionCallItem, OutputMessage, OutputText, ResponseObject
from lorayard.server.api.responses_serving import input_messages, output_messages, responses_param


def test_a_string_is_one_user_message():
    assert input_messages("Hi") == ([{"role": "user", "content": "Hi"}], ["input"])


def test_items_become_chat_turns_with_calls_joined_to_their_assistant_turn():
    items = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Weather in "},
                {"type": "input_text", "text": "Oslo?"},
            ],
        },
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
        },
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Oslo"}',
        },
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}", "id": "fc_2"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {
            "type": "function_call_output",
            "call_id": "call_2",
            "output": [{"type": "input_text", "text": "noon"}],
        },
        {"type": "function_call", "call_id": "call_3", "name": "get_weather", "arguments": "{}"},
    ]
    messages, origins = input_messages(items)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        # a call after a tool result starts a new assistant turn
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_3", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
    ]
    assert origins == ["input.0", "input.1", "input.2", "input.5", "input.6", "input.7"]


@pytest.mark.parametrize(
    ("items", "param"),
    [
        (
            [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}],
            "input.0.content.0.image_url",
        ),
        ([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}], "input.0.content.0"),
        ([{"role": "user", "content": "a"}, {"type": "reasoning"}], "input.1.type"),
        ([{"type": "function_call", "call_id": "c", "name": "f"}], "input.0.arguments"),
        ([{"type": "function_call_output", "output": "x"}], "input.0.call_id"),
        ([{"role": "critic", "content": "x"}], "input.0.role"),
    ],
)
def test_bad_items_are_named(items, param):
    with pytest.raises(APIError) as refused:
        input_messages(items)
    assert refused.value.status == 400 and refused.value.param == param
    assert refused.value.message.startswith(f"{param}: ")


def test_an_output_is_one_assistant_turn():
    def response(*output):
        return ResponseObject(id="r", created_at=0, status="completed", model="m", output=list(output))

    text = OutputMessage(id="msg", status="completed", content=[OutputText(text="Hi")])
    call = FunctionCallItem(id="fc", call_id="call_9", name="f", arguments="{}", status="completed")
    assert output_messages(response(text)) == [{"role": "assistant", "content": "Hi"}]
    assert output_messages(response(call)) == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        }
    ]


@pytest.mark.parametrize(
    ("chat", "responses"),
    [
        ("messages", "input"),
        ("messages.1.content", "instructions"),
        ("messages.2", "input.0"),
        ("messages.9", "input"),
        ("response_format", "text.format"),
        ("response_format.json_schema", "text.format"),
        ("response_format.json_schema.schema", "text.format.schema"),
        ("response_format.json_schema.name", "text.format.name"),
        ("tools.1.function.parameters", "tools.1.parameters"),
        ("tool_choice.function.name", "tool_choice.name"),
        ("tool_choice", "tool_choice"),
        ("max_tokens", "max_output_tokens"),
        ("logprobs", "include"),
        ("temperature", "temperature"),
        (None, None),
    ],
)
def test_chat_fields_map_back(chat, responses):
    origins = ["previous_response_id", "instructions", "input.0"]
    assert responses_param(chat, origins) == responses
