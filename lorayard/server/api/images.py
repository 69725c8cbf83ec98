"""Image content parts -> the engine's :class:`ImageInputs`, for a vision-language base.

An image arrives as an OpenAI content part ``{"type": "image_url", "image_url": {"url": ...}}`` (or a
Responses ``input_image``, translated to one). The URL is a ``data:image/...;base64,...`` URL, or,
only when the server was started with ``--image-dir``, ``file:NAME`` naming a file inside that folder.
Nothing is fetched from the network. Each image is checked against ``--max-image-bytes`` and
``--max-image-pixels`` (its header, before a pixel is decoded: a decompression bomb is a 400, never an
allocation), a request holds at most ``--max-images``; every refusal is a 400 naming the field.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorayard.server.api.errors import APIError
from lorayard.server.engine.types import ImageInputs
from lorayard.vision import ImageError, ImageLimits, decode_image, expand_image_pads, preprocess_images

_DATA_URL = re.compile(r"^data:(?P<mime>image/[\w.+-]+)?(?P<base64>;base64)?,(?P<data>.*)$", re.DOTALL)


@dataclass(frozen=True)
class ImageRef:
    """One image part of a request: its URL and the field it came from (for a 400's ``param``)."""

    url: str
    param: str


def _bad(param: str, message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def image_bytes(ref: ImageRef, limits: ImageLimits, image_dir: Path | None) -> bytes:
    """The encoded image a URL names: a base64 data URL, or a file inside ``image_dir``."""
    url = ref.url
    match = _DATA_URL.match(url)
    if match:
        if not match["base64"]:
            raise _bad(ref.param, "a data: URL must be base64 (data:image/png;base64,...)")
        if len(match["data"]) > limits.max_bytes * 4 // 3 + 4:
            raise _bad(ref.param, f"the image is over {limits.max_bytes} bytes (--max-image-bytes)")
        try:
            return base64.b64decode(match["data"], validate=True)
        except (binascii.Error, ValueError):
            raise _bad(ref.param, "the data: URL is not valid base64") from None
    if url.startswith("file:"):
        return _file_bytes(ref, url.removeprefix("file:").removeprefix("//"), limits, image_dir)
    scheme = url.split(":", 1)[0] if ":" in url else url[:20]
    raise _bad(
        ref.param,
        f"images are accepted as data: URLs{' or file: URLs' if image_dir else ''}; this server fetches "
        f"nothing from the network ({scheme!r} URLs are refused)",
        "unsupported_image_url",
    )


def _file_bytes(ref: ImageRef, name: str, limits: ImageLimits, image_dir: Path | None) -> bytes:
    if image_dir is None:
        raise _bad(ref.param, "file: URLs are off (the server has no --image-dir)", "unsupported_image_url")
    root = image_dir.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise _bad(ref.param, f"no image {name!r} in the server's image folder")
    if path.stat().st_size > limits.max_bytes:
        raise _bad(ref.param, f"the image is over {limits.max_bytes} bytes (--max-image-bytes)")
    return path.read_bytes()


def request_images(
    refs: list[ImageRef], processor: Any, limits: ImageLimits, image_dir: Path | None
) -> tuple[ImageInputs, list[int]]:
    """Decode, check and preprocess a request's images -> (the engine's inputs, each image's pad
    token count). 400 naming the image's field for any image we will not read."""
    if len(refs) > limits.max_images:
        raise _bad(
            refs[limits.max_images].param, f"at most {limits.max_images} images per request (--max-images)"
        )
    decoded = []
    for ref in refs:
        try:
            decoded.append(decode_image(image_bytes(ref, limits, image_dir), limits))
        except ImageError as exc:
            raise _bad(ref.param, str(exc)) from None
    pixels, grids = preprocess_images(processor, [d.image for d in decoded])
    merge = int(processor.merge_size)
    counts = [t * h * w // (merge * merge) for t, h, w in grids]
    return ImageInputs(pixels, tuple(grids), tuple(d.sha256 for d in decoded)), counts


def with_image_pads(prompt_ids: list[int], pad_id: int, counts: list[int]) -> list[int]:
    """The rendered prompt with each image's placeholder expanded; 400 on ``messages`` when the text
    itself holds an image placeholder (a prompt whose images would not line up with their parts)."""
    try:
        return expand_image_pads(prompt_ids, pad_id, counts)
    except ValueError as exc:
        raise _bad("messages", f"{exc}: the text may not spell the image placeholder itself") from None
