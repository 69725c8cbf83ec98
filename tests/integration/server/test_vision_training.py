"""An image adapter end to end: the training job trains a LoRA on a tiny random Qwen2.5-VL with the
generated shapes-and-colours dataset (messages whose image parts point at PNG files next to the data),
publishes it, and a real server serves it: a chat with an image answers what HF ``generate`` + PEFT
answers with the published adapter on the same ids and pixels."""

from __future__ import annotations

import json

import httpx
import pytest
from safetensors import safe_open

from lorayard.testing.shapes import data_url, shape_image, write_dataset
from lorayard.train.__main__ import main as train_main
from lorayard.volume import read_manifest

from .conftest import start_server
from .test_vision_serving import MAX_TOKENS, _reference

TRAIN = ["--batch-size", "4", "--eval-steps", "2", "--lr", "1e-3", "--max-steps", "3"]


@pytest.fixture(scope="module")
def trained(tiny_arch_base, tmp_path_factory):
    base = tiny_arch_base("qwen2_5_vl")
    root = tmp_path_factory.mktemp("vl-train")
    data = write_dataset(root / "data", count=12)
    args = ["--base-model", str(base), "--adapters-dir", str(root / "adapters"), "--data", str(data)]
    assert train_main([*args, *TRAIN, "--name", "shapes", "--target-modules", "all-linear"]) == 0
    return base, root / "adapters"


def test_the_job_trains_the_language_model_only(trained):
    _, adapters = trained
    version = adapters / "shapes" / "v1"
    manifest = read_manifest(version)
    assert manifest.name == "shapes" and manifest.version == 1
    with safe_open(str(version / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert keys and all(".language_model.layers." in k for k in keys), keys[:3]
    config = json.loads((version / "adapter_config.json").read_text())
    assert "language_model" in str(config["target_modules"])


def test_the_published_image_adapter_is_served_with_peft_parity(trained, tmp_path):
    base, adapters = trained
    server = start_server(
        ["--base-model", str(base), "--adapters-dir", str(adapters)], tmp_path / "server.log"
    )
    try:
        image = shape_image("green", "circle")
        answer = httpx.post(
            f"{server.v1}/chat/completions",
            json={
                "model": "shapes",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url(image)}},
                            {"type": "text", "text": "What is this?"},
                        ],
                    }
                ],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
            },
            timeout=120,
        )
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    expected, prompt_tokens = _reference(base, adapters / "shapes" / "v1", "What is this?", [image])
    assert answer.json()["choices"][0]["message"]["content"] == expected
    assert answer.json()["usage"]["prompt_tokens"] == prompt_tokens
