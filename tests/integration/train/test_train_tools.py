"""Training for tool use, end to end on the real embedded model: the bundled tool dataset trains an
adapter whose manifest records its call format, and served, it calls the tool for a prompt like its
training data (tool_choice auto: the adapter decides), with arguments valid against the schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import openai
import pytest

from lorayard.testing.server import start_server
from lorayard.train.config import PACKAGE_DIR
from lorayard.volume import AdapterVolume, read_manifest

REPO = Path(__file__).resolve().parents[3]
# A real training run (16 steps of the embedded model) and a server: minutes on a shared CPU.
pytestmark = pytest.mark.timeout(1500)
TOOLS = json.loads((PACKAGE_DIR / "demo_data" / "tools.jsonl").read_text().splitlines()[0])["tools"]


def test_an_adapter_trained_on_tool_data_calls_the_tool(tmp_path):
    adapters = tmp_path / "adapters"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lorayard.train", "--config", str(PACKAGE_DIR / "configs" / "tools.yaml"),
         "--adapters-dir", str(adapters), "--max-steps", "16", "--batch-size", "4", "--lr", "2e-3",
         "--eval-steps", "16", "--eval-max-new-tokens", "4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_manifest(AdapterVolume(adapters).resolve("tools").path).tool_format == "hermes"

    server = start_server(["--adapters-dir", str(adapters)], tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="tools",
            messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
            tools=TOOLS,
            temperature=0,
            max_tokens=48,
        ).choices[0]
    finally:
        server.stop()
    assert reply.finish_reason == "tool_calls", reply
    (call,) = reply.message.tool_calls
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert call.function.name == "get_weather"
