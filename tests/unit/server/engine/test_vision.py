"""Vision-language bases (tiny random Qwen2.5-VL and Qwen3-VL, deepstack included) served exactly by
our engine: image embeddings from the HF vision tower in place of the image-pad tokens, M-RoPE
positions in prefill and decode; greedy output equal to HF ``generate`` (and PEFT's with two adapters)
for chats with one and two images, mixed in one batch with text-only rows, prefilled in chunks that
cut through images; the prefix cache keyed by the images; the startup parity probe over a prompt with
an image; adapters on the vision tower refused by name.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

from lorayard.adapter_files import AdapterFormatError, load_adapter
from lorayard.architectures import ARCHITECTURES
from lorayard.base_model import load_base_model, resolve_base_model
from lorayard.server.engine.engine import Engine
from lorayard.server.engine.parity_probe import probe_runner
from lorayard.server.engine.prepacked_linear import PackedLinear, prepack_available
from lorayard.server.engine.types import ImageInputs, InvalidRequest, Request, SamplingParams
from lorayard.server.settings import Settings
from lorayard.testing.random_adapter import build_random_adapter
from lorayard.testing.shapes import shape_image
from lorayard.vision import (
    IMAGE_PAD,
    IMAGE_PLACEHOLDER,
    expand_image_pads,
    load_image_processor,
    preprocess_images,
)

MAX_TOKENS = 8
ADAPTERS = {"all8": {"r": 8, "lora_alpha": 16}, "all4": {"r": 4, "lora_alpha": 4, "use_rslora": True}}


VISION_LANGUAGE = sorted(name for name, arch in ARCHITECTURES.items() if arch.vision)


@pytest.fixture(scope="module", params=VISION_LANGUAGE)
def vl(request, tiny_arch_base, tmp_path_factory):
    """(base folder, adapter folders): a tiny vision-language base and two language-model adapters."""
    base = tiny_arch_base(request.param)
    root = tmp_path_factory.mktemp("vl-adapters")
    adapters = {}
    arch = ARCHITECTURES[request.param]
    targets = arch.peft_target_modules(arch.lora_targets)
    for seed, (name, spec) in enumerate(ADAPTERS.items()):
        adapters[name] = root / name
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
        build_random_adapter(model, adapters[name], seed, b_scale=4.0, target_modules=targets, **spec)
    return base, adapters


def _prompt(base: Path, text: str, images: list[Image.Image]) -> tuple[list[int], ImageInputs | None]:
    tokenizer = AutoTokenizer.from_pretrained(base)
    content = "".join(IMAGE_PLACEHOLDER for _ in images) + text
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = list(ids)
    if not images:
        return ids, None
    processor = load_image_processor(base)
    pixels, grids = preprocess_images(processor, images)
    merge = processor.merge_size
    pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    ids = expand_image_pads(ids, pad, [t * h * w // merge**2 for t, h, w in grids])
    hashes = tuple(str(hash(image.tobytes())) for image in images)
    return ids, ImageInputs(pixels, tuple(grids), hashes)


def _reference(
    base: Path, adapter: Path | None, ids: list[int], images: ImageInputs | None, **load: Any
) -> list[int]:
    """HF ``generate`` (+ PEFT); ``load``: more from_pretrained arguments (a quantization config)."""
    from peft import PeftModel

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32, **load)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    input_ids = torch.tensor([ids])
    extra = {}
    if images is not None:
        extra = {
            "pixel_values": images.pixel_values,
            "image_grid_thw": torch.tensor(images.grid_thw),
            "mm_token_type_ids": (input_ids == model.config.image_token_id).int(),
        }
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **extra,
        )
    return out[0, len(ids) :].tolist()


class _Handle:
    def __init__(self, key: str, slot: int) -> None:
        self.name = key.split("@")[0]
        self.key, self.slot = key, slot


def _engine(base: Path, **settings) -> Engine:
    config = Settings(device="cpu", **{"max_model_len": 256, **settings}).engine_config()
    return Engine.from_base(resolve_base_model(str(base)), config, dtype=torch.float32, eos_token_ids=set())


def _run(engine: Engine, requests: list[Request]) -> list[tuple[list[int], int | None]]:
    """Each request's tokens and cached prompt tokens, submitted a little apart (joining a running batch)."""

    async def collect(request: Request) -> tuple[list[int], int | None]:
        tokens, cached = [], None
        async for event in engine.submit(request):
            if event.token_id is not None:
                tokens.append(event.token_id)
            if event.finish_reason is not None:
                cached = event.cached_tokens
        return tokens, cached

    async def run() -> list[tuple[list[int], int | None]]:
        engine.start()
        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(collect(request)))
            await asyncio.sleep(0.01)
        return list(await asyncio.gather(*tasks))

    return asyncio.run(run())


def _request(ids: list[int], images: ImageInputs | None, handle: _Handle | None = None) -> Request:
    return Request(
        uuid.uuid4().hex, ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), handle, images
    )


def test_images_mixed_with_text_and_adapters_equal_hf(vl):
    """Prefill in chunks of 7: an image's pad tokens span chunks, and chunks start inside images
    (one-chunk prefill is the prefix-cache test's and the probe's)."""
    base, adapters = vl
    red, blue = shape_image("red", "square"), shape_image("blue", "circle", (84, 56))
    cases = [
        (None, _prompt(base, "What shape is this?", [red])),
        ("all8", _prompt(base, "Compare the two pictures.", [red, blue])),
        (None, _prompt(base, "Say hello in French.", [])),
        ("all4", _prompt(base, "What colour?", [blue])),
        ("all8", _prompt(base, "Count to five.", [])),
    ]
    engine = _engine(base, prefill_chunk=7, idle_prefill_chunk=7)
    handles = {
        name: _Handle(
            name, engine.load_adapter_weights(name, load_adapter(folder, AutoConfig.from_pretrained(base)))
        )
        for name, folder in adapters.items()
    }
    try:
        got = _run(engine, [_request(ids, images, handles.get(name or "")) for name, (ids, images) in cases])
    finally:
        engine.stop()
    for (name, (ids, images)), (tokens, _cached) in zip(cases, got, strict=True):
        assert tokens == _reference(base, adapters[name] if name else None, ids, images), name


def test_4bit_base_quantizes_the_language_model_and_equals_hf(vl):
    """QLoRA serving on a vision-language base: the language model NF4, the vision tower left in the
    compute dtype (bitsandbytes skips ``model.visual``); an image chat for an adapter and a text chat
    for the base, in one batch, equal HF generate (+ PEFT) on the same 4-bit model."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    base, adapters = vl
    cases = [
        ("all8", _prompt(base, "What shape is this?", [shape_image("red", "square")])),
        (None, _prompt(base, "Say hello in French.", [])),
    ]
    engine = _engine(base, quantization="4bit")
    linears = {n: type(m) for n, m in engine.model.named_modules() if isinstance(m, torch.nn.Linear)}
    tower = [kind for name, kind in linears.items() if name.startswith("model.visual.")]
    assert tower and all(kind is torch.nn.Linear for kind in tower)  # bnb's layers subclass Linear
    assert linears["model.language_model.layers.0.mlp.down_proj"] is bnb.nn.Linear4bit
    weights = load_adapter(adapters["all8"], AutoConfig.from_pretrained(base))
    handle = _Handle("all8", engine.load_adapter_weights("all8", weights))
    try:
        got = _run(engine, [_request(ids, images, handle if name else None) for name, (ids, images) in cases])
    finally:
        engine.stop()
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype="float32",
        llm_int8_skip_modules=["model.visual", "lm_head"],
    )
    for (name, (ids, images)), (tokens, _cached) in zip(cases, got, strict=True):
        adapter = adapters[name] if name else None
        expected = _reference(base, adapter, ids, images, quantization_config=nf4, device_map={"": "cpu"})
        assert tokens == expected, name


def test_prefix_cache_keys_images(vl):
    """The same image twice hits the cache; a different image of the same size does not."""
    base, _ = vl
    text = "Describe the picture in detail, please, with every shape and every colour you see."
    red_ids, red = _prompt(base, text, [shape_image("red", "square")])
    green_ids, green = _prompt(base, text, [shape_image("green", "square")])
    assert red_ids == green_ids  # same size: same tokens; only the pixels differ
    engine = _engine(base)
    try:
        ((first, cold),) = _run(engine, [_request(red_ids, red)])
        ((again, hit),) = _run(engine, [_request(red_ids, red)])
        ((other, miss),) = _run(engine, [_request(green_ids, green)])
    finally:
        engine.stop()
    assert cold == 0 and hit and hit >= 16 and miss == 0
    assert first == again == _reference(base, None, red_ids, red)
    assert other == _reference(base, None, green_ids, green)


def test_image_tokens_must_match_the_images(vl):
    base, _ = vl
    ids, images = _prompt(base, "What shape?", [shape_image("red", "square")])
    assert images is not None
    engine = _engine(base)
    try:
        with pytest.raises(InvalidRequest) as without:
            engine.submit(_request(ids, None))
        assert without.value.param == "prompt_ids"
        pad = AutoTokenizer.from_pretrained(base).convert_tokens_to_ids(IMAGE_PAD)
        one_short = list(ids)
        one_short.remove(pad)
        with pytest.raises(InvalidRequest) as short:
            engine.submit(_request(one_short, images))
        assert short.value.param == "prompt_ids"
    finally:
        engine.stop()


def test_vision_tower_adapters_are_refused(vl, tmp_path):
    base, _ = vl
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    build_random_adapter(model, tmp_path / "visual", 0, target_modules=["qkv"], r=4, lora_alpha=4)
    with pytest.raises(AdapterFormatError, match="vision tower"):
        load_adapter(tmp_path / "visual", AutoConfig.from_pretrained(base))


def test_parity_probe_covers_an_image(vl):
    base, _ = vl
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    result = probe_runner(model)
    assert result.ok and result.image_tokens > 0, result


def test_bf16_prepacks_the_language_model_and_changes_no_token(vl):
    """bf16 on the CPU: the language model's linears and lm_head run prepacked (the vision tower and
    its own linears as they were), the startup probe with its image passes over them, and an image
    chat, an adapter's image chat and a text chat give the same tokens as the same engine over the
    plain modules."""
    base, adapters = vl
    red, blue = shape_image("red", "square"), shape_image("blue", "circle", (84, 56))
    cases = [
        (None, _prompt(base, "What shape is this?", [red])),
        ("all8", _prompt(base, "What colour?", [blue])),
        (None, _prompt(base, "Say hello in French.", [])),
    ]
    config = Settings(device="cpu", max_model_len=256).engine_config()
    resolved = resolve_base_model(str(base))
    plain = load_base_model(resolved, device="cpu", dtype=torch.bfloat16).eval()
    engines = {
        True: Engine.from_base(resolved, config, dtype=torch.bfloat16, eos_token_ids=set()),
        False: Engine(plain, config, eos_token_ids=set(), prepack=False),
    }
    results = {}
    for prepack, engine in engines.items():
        if prepack and prepack_available(torch.bfloat16, torch.device("cpu")):
            packed = [m for m in engine.model.modules() if isinstance(m, PackedLinear)]
            assert len(packed) == engine.runner.prepacked.linears > 0
            assert not any(isinstance(m, PackedLinear) for m in engine.model.model.visual.modules())
        weights = load_adapter(adapters["all8"], AutoConfig.from_pretrained(base))
        handle = _Handle("all8", engine.load_adapter_weights("all8", weights))
        requests = [_request(ids, images, handle if name else None) for name, (ids, images) in cases]
        try:
            results[prepack] = [tokens for tokens, _ in _run(engine, requests)]
        finally:
            engine.stop()
    assert results[True] == results[False]
