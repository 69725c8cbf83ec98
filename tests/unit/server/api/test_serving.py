"""The serving layer's pure checks and builders, without a server: ids, logit_bias, schemas, tool calls."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from lorayard.server.api.errors import APIError, EngineFailed
from lorayard.server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    ResponseFormat,
    Tool,
)
from lorayard.server.api.responses import TokenTexts
from lorayard.server.api.serving import (
    _check_seed,
    _check_tool_schemas,
    _guided_from_format,
    _logit_bias,
    _token_ids,
)
from lorayard.server.api.streaming import SSE_DONE, sse_stream
from lorayard.server.settings import Settings

VOCAB = 100
LIMIT = Settings.model_fields["max_schema_bytes"].default


def _param(call) -> str | None:
    with pytest.raises(APIError) as info:
        call()
    assert info.value.status == 400
    return info.value.param


def test_token_ids_must_be_in_the_vocabulary():
    assert _token_ids("prompt", [0, 99], VOCAB) == [0, 99]
    for bad in ([-1], [100], [10**9]):
        assert _param(lambda bad=bad: _token_ids("stop_token_ids", bad, VOCAB)) == "stop_token_ids"


def test_logit_bias_keys_are_strings_of_ids_and_values_bounded():
    assert _logit_bias({"7": 100, "3": -100.0}, VOCAB) == ((3, -100.0), (7, 100.0))
    assert _logit_bias(None, VOCAB) == ()
    for bad in ({"x": 1}, {"100": 1}, {"-1": 1}, {"5": 100.5}):
        assert _param(lambda bad=bad: _logit_bias(bad, VOCAB)) == "logit_bias"


def test_response_format_becomes_a_grammar_or_a_400():
    assert _guided_from_format(ResponseFormat(type="text"), LIMIT) is None
    assert _guided_from_format(ResponseFormat(type="json_object"), LIMIT).kind == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    guided = _guided_from_format(
        ResponseFormat.model_validate(
            {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        ),
        LIMIT,
    )
    assert guided.kind == "json_schema" and json.loads(guided.schema) == schema
    bad = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 1}}}
    )
    assert _param(lambda: _guided_from_format(bad, LIMIT)) == "response_format.json_schema.schema"


def _chat(**extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **extra})


def _tool(name: str, schema: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": schema}}


A = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
B = {"type": "object", "properties": {"y": {"type": "string"}}, "required": ["y"]}


def test_text_offsets_follow_the_decoded_text(real_tokenizer):
    texts = TokenTexts(real_tokenizer)
    text = "Hello wörld, 你好!"
    ids = real_tokenizer(text)["input_ids"]
    offsets = texts.offsets(ids)
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text)
    assert texts(ids[0]) == "Hello"


def test_a_stream_that_fails_ends_with_an_error_event_and_done():
    async def chunks():
        yield ResponseFormat(type="text")
        raise EngineFailed("row failed")

    async def run() -> list[str]:
        return [event async for event in sse_stream(chunks(), errors)]

    errors: list[int] = []
    events = asyncio.run(run())
    assert events[-1] == SSE_DONE and errors == [500]
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_error" and error["message"] == "row failed"


def _schema_format(schema: object) -> ResponseFormat:
    return ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )


def test_schemas_past_the_size_or_depth_limit_are_400_naming_it():
    deep: dict = {"type": "integer"}
    for _ in range(100):  # the RecursionError (a 500 with ~2,000 logged traceback lines)
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(APIError) as info:
        _guided_from_format(_schema_format(deep), LIMIT)
    assert info.value.param == "response_format.json_schema.schema" and "deeper than" in info.value.message
    huge = {"enum": [f"value-{i}" for i in range(20_000)]}
    with pytest.raises(APIError) as info:
        _guided_from_format(_schema_format(huge), LIMIT)
    assert info.value.code == "schema_too_large" and "--max-schema-bytes" in info.value.message
    tools = [
        _tool(f"t{i}", {"type": "object", "properties": {"a": {"enum": list(range(900))}}}) for i in range(20)
    ]
    with pytest.raises(APIError) as info:  # each tool fits; the grammar holding them all does not
        _check_tool_schemas([Tool.model_validate(t) for t in tools], LIMIT)
    assert info.value.param == "tools"


def test_seeds_outside_torchs_range_are_400():
    _check_seed(2**64 - 1, 1)
    _check_seed(-(2**63), 3)
    for seed, n in ((2**64, 1), (2**64 - 2, 3), (-(2**63) - 1, 1)):
        with pytest.raises(APIError) as info:
            _check_seed(seed, n)
        assert info.value.param == "seed"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a\ud800b"}, "prompt"),
        ({"prompt": ["ok", "x\udfff"]}, "prompt"),
        ({"prompt": "ok", "stop": ["\ud800"]}, "stop"),
        (
            {
                "prompt": "ok",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"enum": ["\ud800"]}},
                },
            },
            "response_format",
        ),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(body, param):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    assert info.value.errors()[0]["loc"][0] == param


def test_a_nul_in_lora_path_is_refused():
    with pytest.raises(ValidationError) as info:
        LoadLoraRequest.model_validate({"lora_name": "a", "lora_path": "/tmp/a\x00b"})
    assert info.value.errors()[0]["loc"] == ("lora_path",)
