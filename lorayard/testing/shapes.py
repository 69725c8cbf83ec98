"""Tiny generated images of shapes and colours: the vision tests' pictures and the bundled image
dataset's, drawn with PIL (no files to ship, the same pixels every time).

    python -m lorayard.testing.shapes OUT [--count 12]   # OUT/images/*.png + OUT/train.jsonl
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle")


def shape_image(color: str, shape: str, size: tuple[int, int] = (56, 56)) -> Image.Image:
    """One ``color`` ``shape`` on white, filling the picture but a margin of 8 pixels."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 8, 8, size[0] - 8, size[1] - 8
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=color)
    elif shape == "triangle":
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=color)
    else:
        draw.rectangle((left, top, right, bottom), fill=color)
    return image


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(image: Image.Image) -> str:
    """The image as a ``data:image/png;base64,...`` URL (an OpenAI image_url part's url)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def write_dataset(out: Path, count: int = 12) -> Path:
    """``count`` pictures (OUT/images/COLOR-SHAPE.png) and OUT/train.jsonl: one conversation per
    picture, the user's image part pointing at the file next to the data, the answer naming it."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for color, shape in itertools.islice(itertools.cycle(itertools.product(COLORS, SHAPES)), count):
        name = f"images/{color}-{shape}.png"
        shape_image(color, shape).save(out / name)
        question = [{"type": "image", "image": name}, {"type": "text", "text": "What is this?"}]
        answer = f"A {color} {shape}."
        rows.append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        )
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=12)
    args = parser.parse_args()
    print(write_dataset(args.out, args.count))


if __name__ == "__main__":
    main()
