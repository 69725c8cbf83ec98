"""Training data with images (a vision-language base): ``messages`` image parts and the LLaMA-Factory /
ShareGPT ``images`` column, read from files next to the data, each placeholder expanded to the
image's pad tokens outside the loss; the collator hands the model its pixels and M-RoPE token types;
every problem is a data error with its ``file:line``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from lorayard.testing.shapes import shape_image, write_dataset
from lorayard.train.data import DataError, prepare_data
from lorayard.train.train import CompletionDataset, PaddingCollator, image_token_id
from lorayard.vision import IMAGE_PAD, load_image_processor

OPTIONS = {"data_format": "auto", "max_length": 512, "system_prompt": None, "val_fraction": 0.5}


@pytest.fixture(scope="module")
def vl(tiny_arch_base):
    base = tiny_arch_base("qwen2_5_vl")
    return base, AutoTokenizer.from_pretrained(base), load_image_processor(base)


def _prepare(files: list[Path], tokenizer, processor, **options):
    return prepare_data(
        train_files=files, val_files=[], tokenizer=tokenizer, seed=0, max_errors=20,
        image_processor=processor, **{**OPTIONS, **options},
    )  # fmt: skip


def test_image_parts_and_the_images_column_render_alike(vl, tmp_path):
    _, tokenizer, processor = vl
    messages = write_dataset(tmp_path, count=2)
    rows = [json.loads(line) for line in messages.read_text().splitlines()]
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(
        "".join(
            json.dumps(
                {
                    "conversations": [
                        {"from": "human", "value": "<image>What is this?"},
                        {"from": "gpt", "value": row["messages"][1]["content"]},
                    ],
                    "images": [row["messages"][0]["content"][0]["image"]],
                }
            )
            + "\n"
            for row in rows
        )
    )
    one = _prepare([messages], tokenizer, processor)
    other = _prepare([sharegpt], tokenizer, processor)
    by_source = {e.images.paths: e for e in [*one.train, *one.validation]}
    pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    for example in [*other.train, *other.validation]:
        twin = by_source[example.images.paths]
        assert example.rendered.ids == twin.rendered.ids
        # 56 x 56 pixels: a 4 x 4 patch grid, merged 2 x 2 -> 4 pad tokens, none of them trained
        assert example.images.grid_thw == ((1, 4, 4),)
        pads = [i for i, t in enumerate(example.rendered.ids) if t == pad]
        assert len(pads) == 4 and not any(example.rendered.labels_mask[i] for i in pads)
        assert any(example.rendered.labels_mask)  # the answer is trained


def test_the_collator_feeds_the_images(vl, tmp_path):
    base, tokenizer, processor = vl
    data = _prepare([write_dataset(tmp_path, count=4)], tokenizer, processor)
    examples = [*data.train, *data.validation]
    dataset = CompletionDataset(examples)
    batch = PaddingCollator(0, image_token_id(tokenizer))([dataset[i] for i in range(len(examples))])
    assert batch["pixel_values"].shape[0] == 16 * len(examples)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * len(examples)
    assert int(batch["mm_token_type_ids"].sum()) == 4 * len(examples)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        with_images = model(**batch).loss
        blank = {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}
        without = model(**blank).loss
    assert not torch.isclose(with_images, without)  # the loss reads the pictures


def test_image_problems_are_data_errors(vl, tmp_path):
    _, tokenizer, processor = vl
    shape_image("red", "square").save(tmp_path / "red.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")

    def row(image: str) -> dict:
        parts = [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]
        return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Red."}]}

    data = tmp_path / "bad.jsonl"
    rows = [
        row("missing.png"),
        row("../outside.png"),
        row("junk.png"),
        row("red.png"),
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as error:
        _prepare([data], tokenizer, processor, data_format="auto")
    text = str(error.value)
    assert f"{data}:1" in text and "'missing.png' is not a file next to the data" in text
    assert f"{data}:2" in text and "'../outside.png'" in text
    assert f"{data}:3" in text and "not a readable image" in text
    assert f"{data}:4" not in text
    marks = tmp_path / "marks.jsonl"
    turns = [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]
    marks.write_text(json.dumps({"conversations": turns, "images": ["red.png"]}) + "\n")
    with pytest.raises(DataError, match="2 <image> marks in the text for 1 images"):
        _prepare([marks], tokenizer, processor)
    # On a text base (no image processor) an image is a problem too.
    (tmp_path / "ok.jsonl").write_text(json.dumps(row("red.png")) + "\n" + json.dumps(row("red.png")) + "\n")
    with pytest.raises(DataError, match="only a vision-language base"):
        _prepare([tmp_path / "ok.jsonl"], tokenizer, None)
