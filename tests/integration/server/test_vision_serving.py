"""A vision-language base served over real HTTP: a tiny random Qwen2.5-VL on 127.0.0.1 with two
published adapters. Chats with one and two images (data: URLs, and file: URLs inside --image-dir) sent
together with text-only chats, for the base and both adapters, answer what HF ``generate`` (+ PEFT)
answers on the same ids and pixels; the Responses API's input_image answers the same; the same image
again is served from the prefix cache, a different image of the same size is not; images past the
limits, network URLs, paths outside the image folder and bad data are 400s naming the field.
"""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoTokenizer

from lorayard.architectures import ARCHITECTURES
from lorayard.base_model import resolve_base_model
from lorayard.chat_format import render_prompt
from lorayard.testing.random_adapter import build_random_adapter
from lorayard.testing.shapes import data_url, png_bytes, shape_image
from lorayard.vision import IMAGE_PAD, IMAGE_PLACEHOLDER, expand_image_pads, load_image_processor
from lorayard.volume import AdapterVolume

from .conftest import publish_folder, start_server

MAX_TOKENS = 8
ADAPTERS = {"a8": {"r": 8, "lora_alpha": 16}, "a4": {"r": 4, "lora_alpha": 4, "use_rslora": True}}


@pytest.fixture(scope="module")
def vl_base(tiny_arch_base) -> Path:
    return tiny_arch_base("qwen2_5_vl")


@pytest.fixture(scope="module")
def adapter_sources(vl_base, tmp_path_factory) -> dict[str, Path]:
    """Two random PEFT adapters on the language model's linears (PEFT's own folders)."""
    root = tmp_path_factory.mktemp("vl-adapters")
    arch = ARCHITECTURES["qwen2_5_vl"]
    for seed, (name, spec) in enumerate(ADAPTERS.items()):
        model = AutoModelForImageTextToText.from_pretrained(vl_base, dtype=torch.float32)
        targets = arch.peft_target_modules(arch.lora_targets)
        build_random_adapter(model, root / name, seed, b_scale=4.0, target_modules=targets, **spec)
    return {name: root / name for name in ADAPTERS}


@pytest.fixture(scope="module")
def server(vl_base, adapter_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("vl-volume")
    base = resolve_base_model(str(vl_base))
    for name, source in adapter_sources.items():
        publish_folder(AdapterVolume(root / "adapters"), name, source, base.fingerprint, base.model_id)
    images = root / "images"
    images.mkdir()
    shape_image("blue", "circle", (84, 56)).save(images / "blue.png")
    server = start_server(
        [
            "--base-model", str(vl_base), "--adapters-dir", str(root / "adapters"),
            "--image-dir", str(images), "--max-images", "2", "--max-image-pixels", "40000",
        ],
        tmp_path_factory.mktemp("logs") / "vl-server.log",
    )  # fmt: skip
    yield server
    server.stop()


def _content(text: str, urls: list[str]) -> list[dict]:
    return [*({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": text}]


def _chat(server, model: str | None, text: str, urls: list[str]) -> httpx.Response:
    body = {
        "model": model or "base",
        "messages": [{"role": "user", "content": _content(text, urls)}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    if model is None:
        body.pop("model")
    return httpx.post(f"{server.v1}/chat/completions", json=body, timeout=120)


def _reference(base: Path, adapter: Path | None, text: str, images: list) -> tuple[str, int]:
    """HF generate (+ PEFT) on the ids and pixels the server should build: -> (text, prompt tokens)."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    content = IMAGE_PLACEHOLDER * len(images) + text
    ids = render_prompt(tokenizer, [{"role": "user", "content": content}])
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    extra = {}
    if images:
        processor = load_image_processor(base)
        out = processor(images=images, return_tensors="pt")
        counts = (out["image_grid_thw"].prod(-1) // processor.merge_size**2).tolist()
        ids = expand_image_pads(ids, tokenizer.convert_tokens_to_ids(IMAGE_PAD), counts)
        extra = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
    input_ids = torch.tensor([ids])
    if images:
        extra["mm_token_type_ids"] = (input_ids == model.config.image_token_id).int()
    with torch.no_grad():
        generated = model.eval().generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **extra,
        )
    return tokenizer.decode(generated[0, len(ids) :], skip_special_tokens=True), len(ids)


def test_images_and_text_for_two_adapters_in_one_batch_equal_hf(server, vl_base, adapter_sources):
    red, blue = shape_image("red", "square"), shape_image("blue", "circle", (84, 56))
    cases = [
        (None, "What shape is this?", [red], [data_url(red)]),
        ("a8", "Compare the two pictures.", [red, blue], [data_url(red), "file:blue.png"]),
        (None, "Say hello in French.", [], []),
        ("a4", "What colour?", [blue], [data_url(blue)]),
        ("a8", "Count to five.", [], []),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda c: _chat(server, c[0], c[1], c[3]), cases))
    for (name, text, images, _urls), answer in zip(cases, answers, strict=True):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        adapter = adapter_sources[name] if name else None
        expected, prompt_tokens = _reference(vl_base, adapter, text, images)
        assert body["choices"][0]["message"]["content"] == expected, (name, text)
        assert body["usage"]["prompt_tokens"] == prompt_tokens


def test_responses_input_image_answers_as_chat(server):
    red = shape_image("red", "square")
    chat = _chat(server, "a4", "What shape is this?", [data_url(red)]).json()
    response = httpx.post(
        f"{server.v1}/responses",
        json={
            "model": "a4",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_image", "image_url": data_url(red)},
                        {"type": "input_text", "text": "What shape is this?"},
                    ],
                }
            ],
            "max_output_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]


def test_prefix_cache_hits_the_same_image_only(server):
    text = "Describe the picture in detail, please, with every shape and every colour you see in it."
    first = _chat(server, None, text, [data_url(shape_image("yellow", "triangle"))]).json()
    again = _chat(server, None, text, [data_url(shape_image("yellow", "triangle"))]).json()
    other = _chat(server, None, text, [data_url(shape_image("green", "triangle"))]).json()
    assert first["usage"]["prompt_tokens"] == other["usage"]["prompt_tokens"]  # same size, same tokens

    def cached(body: dict) -> int:
        return (body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0

    assert cached(again) >= 16 and cached(other) == 0
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("urls", "param", "says"),
    [
        (["http://example.com/x.png"], "messages.0.content.0.image_url.url", "network"),
        (["file:../outside.png"], "messages.0.content.0.image_url.url", "image folder"),
        (["data:image/png;base64,@@@"], "messages.0.content.0.image_url.url", "base64"),
        (["NOT_AN_IMAGE"], "messages.0.content.0.image_url.url", "readable"),
        (["TOO_BIG"], "messages.0.content.0.image_url.url", "pixels"),
        (["RED", "RED", "RED"], "messages.0.content.2.image_url.url", "at most 2 images"),
    ],
)  # fmt: skip
def test_refused_images_name_the_field(server, urls, param, says):
    red = data_url(shape_image("red", "square"))
    # 300 x 300 = 90000 pixels, over --max-image-pixels 40000; a PNG of one colour is a few hundred bytes
    big = (
        "data:image/png;base64,"
        + base64.b64encode(png_bytes(shape_image("red", "square", (300, 300)))).decode()
    )
    junk = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    named = {"RED": red, "TOO_BIG": big, "NOT_AN_IMAGE": junk}
    urls = [named.get(u, u) for u in urls]
    answer = _chat(server, None, "What is it?", urls)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_text_spelling_the_placeholder_is_refused(server):
    answer = _chat(server, None, f"{IMAGE_PLACEHOLDER} what?", [data_url(shape_image("red", "square"))])
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages", answer.text


def test_responses_refusals_name_the_input_field(server):
    part = {"type": "input_image", "image_url": "http://example.com/x.png"}
    response = httpx.post(
        f"{server.v1}/responses",
        json={"input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}, part]}]},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "input.0.content.1.image_url"
