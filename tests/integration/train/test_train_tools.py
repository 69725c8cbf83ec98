"""Training for tool use, end to end: the bundled tool dataset trains an adapter (on the tiny random base
with the real tokenizer and chat template, so in seconds) whose manifest records its call format; served
with those tools, the adapter's call is a valid call to one of them, in the format it was trained on.

A tiny random model learns nothing in two steps, so the call is asked for (``tool_choice: required``):
the test proves the pipeline (data -> render -> train -> manifest -> serve -> parse), not the model."""

from __future__ import annotations

import json

import jsonschema
import openai

from lorayard.testing.server import start_server
from lorayard.train.__main__ import main as train_main
from lorayard.train.config import CONFIGS_DIR, DEMO_DATA_DIR
from lorayard.volume import AdapterVolume, read_manifest

TOOLS = json.loads((DEMO_DATA_DIR / "tools.jsonl").read_text().splitlines()[0])["tools"]


def test_an_adapter_trained_on_tool_data_serves_valid_calls(tmp_path, tiny_base_dir):
    adapters = tmp_path / "adapters"
    args = ["--config", str(CONFIGS_DIR / "tools.yaml"), "--base-model", str(tiny_base_dir)]
    short = ["--max-steps", "2", "--batch-size", "4", "--eval-steps", "2", "--eval-max-new-tokens", "2"]
    assert train_main([*args, "--adapters-dir", str(adapters), *short]) == 0
    assert read_manifest(AdapterVolume(adapters).resolve("tools").path).tool_format == "hermes"

    server = start_server(
        ["--base-model", str(tiny_base_dir), "--adapters-dir", str(adapters)], tmp_path / "log"
    )
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="tools",
            messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=64,
        ).choices[0]
    finally:
        server.stop()
    (call,) = reply.message.tool_calls
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    if reply.finish_reason == "tool_calls":  # a random model may fill its string to max_tokens
        jsonschema.validate(json.loads(call.function.arguments), schema)
    else:
        assert reply.finish_reason == "length"
