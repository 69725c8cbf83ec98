"""Training for tool use, end to end: the bundled tool dataset trains an adapter (on the tiny random base
with the real tokenizer and chat template, so in seconds) whose manifest records its call format; served
with those tools, the adapter's call is a valid call to one of them, in the format it was trained on.

Two versions of one adapter: v1 trained in the base's format (Hermes, the default of a template without
tools support), v2 with ``--tool-call-format llama3_json``. One server serves each version in its own
format (prompt, grammar and parser); /tokenize counts each version's prompt as its chat does; a server
whose ``--tool-call-format`` contradicts a version's manifest refuses that version's tool requests.

A tiny random model learns nothing in two steps, so the call is asked for (``tool_choice: required``):
the tests prove the pipeline (data -> render -> train -> manifest -> serve -> parse), not the model."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from lorayard.testing.server import start_server
from lorayard.train.__main__ import main as train_main
from lorayard.train.config import CONFIGS_DIR, DEMO_DATA_DIR
from lorayard.volume import AdapterVolume, read_manifest

TOOLS = json.loads((DEMO_DATA_DIR / "tools.jsonl").read_text().splitlines()[0])["tools"]
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
HEADS = {"tools@v1": '<tool_call>\n{"name": "', "tools@v2": '{"name": "'}
"""How each version's call starts: v1 in Hermes, v2 in Llama 3's JSON."""


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base_dir):
    """An adapters folder with ``tools`` v1 (the base's format) and v2 (``--tool-call-format
    llama3_json``)."""
    folder = tmp_path_factory.mktemp("tool-adapters")
    args = ["--config", str(CONFIGS_DIR / "tools.yaml"), "--base-model", str(tiny_base_dir)]
    short = ["--max-steps", "2", "--batch-size", "4", "--eval-steps", "2", "--eval-max-new-tokens", "2"]
    assert train_main([*args, "--adapters-dir", str(folder), *short]) == 0
    assert (
        train_main([*args, "--adapters-dir", str(folder), *short, "--tool-call-format", "llama3_json"]) == 0
    )
    return folder


@pytest.fixture(scope="module")
def server(adapters, tiny_base_dir, tmp_path_factory):
    served = start_server(
        ["--base-model", str(tiny_base_dir), "--adapters-dir", str(adapters)],
        tmp_path_factory.mktemp("logs") / "tools.log",
    )
    yield served
    served.stop()


def _call(server, model: str, **extra):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    return client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=64,
        **extra,
    )


@pytest.mark.parametrize("version", ["tools@v1", "tools@v2"])
def test_each_version_serves_valid_calls_in_the_format_it_was_trained_in(adapters, server, version):
    trained = {"tools@v1": "hermes", "tools@v2": "llama3_json"}[version]
    assert read_manifest(AdapterVolume(adapters).resolve(version).path).tool_format == trained
    answer = _call(server, version, logprobs=True)
    reply = answer.choices[0]
    generated = "".join(entry.token for entry in reply.logprobs.content)
    assert generated.startswith(HEADS[version])  # the grammar wrote the version's format...
    (call,) = reply.message.tool_calls  # ...and the parser read it back
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    if reply.finish_reason == "tool_calls":  # a random model may fill its string to max_tokens
        jsonschema.validate(json.loads(call.function.arguments), schema)
    else:
        assert reply.finish_reason == "length"
    # /tokenize with that model renders as its chat did: the prompt shows the version's format.
    tokenized = httpx.post(
        server.base_url + "/tokenize",
        json={"model": version, "messages": ASK, "tools": TOOLS, "return_token_strs": True},
        timeout=60,
    ).json()
    assert tokenized["count"] == answer.usage.prompt_tokens
    prompt = httpx.post(server.base_url + "/detokenize", json={"tokens": tokenized["tokens"]}, timeout=60)
    assert HEADS[version] + "<function-name>" in prompt.json()["prompt"]


def test_a_flag_that_contradicts_a_versions_format_refuses_its_tool_requests(
    adapters, tiny_base_dir, tmp_path
):
    """``--tool-call-format hermes``: v2 (trained in llama3_json) would get a prompt and a parser it was
    not trained on; its tool requests are a 400 naming both, its plain chat and v1 are served."""
    flagged = start_server(
        ["--base-model", str(tiny_base_dir), "--adapters-dir", str(adapters), "--tool-call-format", "hermes"],
        tmp_path / "log",
    )
    try:
        with pytest.raises(openai.BadRequestError) as refused:
            _call(flagged, "tools@v2")
        error = refused.value.body
        assert error["code"] == "tool_format_conflict" and error["param"] == "model"
        assert "'llama3_json'" in error["message"] and "--tool-call-format" in error["message"]
        counted = httpx.post(
            flagged.base_url + "/tokenize",
            json={"model": "tools@v2", "messages": ASK, "tools": TOOLS},
            timeout=60,
        )
        assert counted.status_code == 400 and counted.json()["error"]["code"] == "tool_format_conflict"
        assert _call(flagged, "tools@v1").choices[0].message.tool_calls
        client = openai.OpenAI(base_url=flagged.v1, api_key="unused", max_retries=0, timeout=120)
        plain = client.chat.completions.create(model="tools@v2", messages=ASK, max_tokens=4)
        assert plain.choices[0].finish_reason in ("stop", "length")
    finally:
        flagged.stop()
