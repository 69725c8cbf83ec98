"""Requests that used to answer 500 or hold the server up (issue 23, items 3 and 7), each beside an
innocent request that must finish intact, on one tiny-base server with default limits.

Bodies are sent as raw bytes where JSON can say what Python's encoder will not (a lone surrogate).
All requests of a test share one keep-alive connection: a refusal must leave it usable.
"""

from __future__ import annotations

import json
import random
import string
import threading
import time

import httpx
import jsonschema
import pytest

from lorayard.testing.server import metric_value

from .conftest import small_server

PERSON = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
"""Small and closed: even the tiny random model's greedy answer completes within max_tokens."""


def _schema_body(schema: dict, **extra) -> dict:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    return {"prompt": "Person:", "max_tokens": 64, "temperature": 0, "response_format": fmt, **extra}


def _nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def huge_enum(count: int, seed: int = 0) -> dict:
    """The issue's schema: an enum of tens of thousands of distinct strings."""
    rng = random.Random(seed)
    return {"enum": ["".join(rng.choices(string.ascii_letters, k=10)) for _ in range(count)]}


@pytest.fixture(scope="module")
def hostile_server(tiny_base_dir, tmp_path_factory, tiny_adapter_source):
    root = tmp_path_factory.mktemp("hostile")
    server = small_server(tiny_base_dir, root, tiny_adapter_source, "--max-n", "4")
    yield server
    server.stop()


# (path, raw JSON body, the field the 400 must name): each answered 500 before.
JSON = {"Content-Type": "application/json"}
CASES = [
    ("/v1/completions", json.dumps(_schema_body(_nested(100))), "response_format.json_schema.schema"),
    ("/v1/completions", '{"prompt": "a \\ud800 b", "max_tokens": 2}', "prompt"),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "\\udc00"}], "max_tokens": 2}',
        "messages",
    ),
    ("/tokenize", '{"prompt": "x\\ud800"}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "temperature": 1e-40}', "temperature"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "seed": 18446744073709551616}', "seed"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "seed": 18446744073709551615, "n": 2}', "seed"),
    ("/v1/load_lora_adapter", '{"lora_name": "x", "lora_path": "/tmp/a\\u0000b"}', "lora_path"),
]


@pytest.mark.parametrize(("path", "raw", "param"), CASES)
def test_bad_input_is_a_400_naming_the_field_and_the_connection_stays_usable(
    hostile_server, path, raw, param
):
    with httpx.Client(base_url=hostile_server.base_url, timeout=60) as client:
        response = client.post(path, content=raw, headers=JSON)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param, error
        # the next request on the same keep-alive connection
        again = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert again.status_code == 200, again.text
    assert " 500 " not in hostile_server.log() and "Traceback" not in hostile_server.log()


def test_seed_at_the_edge_of_the_range_is_served(hostile_server):
    body = {"prompt": "hi", "max_tokens": 4, "seed": 2**64 - 2, "n": 2, "temperature": 1.0}
    response = httpx.post(hostile_server.base_url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text


def _timed(call) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_huge_enums_are_refused_at_once_and_delay_no_one(hostile_server):
    """Six 40k-string enums (each ~0.5 MB, under the body limit) beside a cold adapter request and an
    innocent structured request: the enums get 400 naming the limit, the others 200 at once."""
    url = hostile_server.base_url
    huge = json.dumps(_schema_body(huge_enum(40_000)))
    results: list[httpx.Response] = []

    def send_huge() -> None:
        results.append(httpx.post(url + "/v1/completions", content=huge, headers=JSON, timeout=60))

    threads = [threading.Thread(target=send_huge) for _ in range(6)]
    for thread in threads:
        thread.start()
    adapter, adapter_s = _timed(
        lambda: httpx.post(
            url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "adapter": "ok"}, timeout=60
        )
    )
    innocent, innocent_s = _timed(
        lambda: httpx.post(url + "/v1/completions", json=_schema_body(PERSON), timeout=60)
    )
    for thread in threads:
        thread.join(60)
    assert adapter.status_code == 200 and innocent.status_code == 200, (adapter.text, innocent.text)
    assert adapter_s < 10 and innocent_s < 10, (adapter_s, innocent_s)
    jsonschema.validate(json.loads(innocent.json()["choices"][0]["text"]), PERSON)
    assert [r.status_code for r in results] == [400] * 6
    error = results[0].json()["error"]
    assert error["code"] == "schema_too_large" and "--max-schema-bytes" in error["message"], error


def test_unenforceable_keywords_are_400_naming_them(hostile_server):
    for schema, keyword in [
        ({"type": "integer", "multipleOf": 5}, None),
        ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
        ({"type": "array", "contains": {"const": 1}}, "contains"),
        ({"type": "array", "contains": {"const": 1}, "minContains": 2, "maxContains": 3}, "contains"),
        ({"$ref": "https://example.com/person.json"}, "$ref"),
        (
            {"type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": False},
            "required",
        ),
        ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, "patternProperties"),
    ]:
        response = httpx.post(
            hostile_server.base_url + "/v1/completions", json=_schema_body(schema, max_tokens=8), timeout=60
        )
        if keyword is None:
            assert response.status_code == 200, response.text
            continue
        assert response.status_code == 400, (schema, response.text)
        error = response.json()["error"]
        assert error["param"] == "response_format" and f"'{keyword}'" in error["message"], error


def test_refusals_are_counted_and_logged_with_their_status(hostile_server):
    url = hostile_server.base_url
    before = metric_value(httpx.get(url + "/metrics").text, "lorayard_requests_total", status="400")
    httpx.post(url + "/v1/completions", json={"prompt": "hi", "temperature": 1e-30}, timeout=60)
    after = metric_value(httpx.get(url + "/metrics").text, "lorayard_requests_total", status="400")
    assert after == before + 1
    assert "POST /v1/completions 400" in hostile_server.log()
