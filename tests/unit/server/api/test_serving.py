"""The serving layer's pure checks and builders, without a server: ids, logit_bias, schemas."""

from __future__ import annotations

import asyncio
import json

import pytest

from lorayard.server.api.errors import APIError, EngineFailed
from lorayard.server.api.protocol import ResponseFormat
from lorayard.server.api.responses import TokenTexts
from lorayard.server.api.serving import _guided_from_format, _logit_bias, _token_ids
from lorayard.server.api.streaming import SSE_DONE, sse_stream

VOCAB = 100


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
    assert _guided_from_format(ResponseFormat(type="text")) is None
    assert _guided_from_format(ResponseFormat(type="json_object")).kind == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    guided = _guided_from_format(
        ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    )
    assert guided.kind == "json_schema" and json.loads(guided.schema) == schema
    bad = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 1}}}
    )
    assert _param(lambda: _guided_from_format(bad)) == "response_format.json_schema.schema"


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
