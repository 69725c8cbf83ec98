"""Images for a vision-language base (Qwen2.5-VL): decoding within limits, the base's own image
processor, and the prompt's image placeholders. Shared by the server (image content parts) and the
training job, so both feed the model the same pixels and the same tokens.

A chat renders each image as ``<|vision_start|><|image_pad|><|vision_end|>`` (what Qwen-VL's chat
template writes for an image part) with whatever template renders the conversation; after tokenizing,
each image's one ``<|image_pad|>`` becomes as many as the vision tower gives it embeddings
(patches / merge_size^2), as transformers' processor does in text.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
"""What one image is in a rendered prompt, before its pad token is expanded."""

IMAGE_PAD = "<|image_pad|>"


class ImageError(ValueError):
    """An image we will not read (too large, not an image, a decompression bomb); the message says why."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 1024 * 1024
    """Encoded size of one image."""
    max_pixels: int = 4096 * 4096
    """width * height of one image, checked from its header before any pixel is decoded."""
    max_images: int = 8
    """Images in one request."""


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image
    sha256: str
    """Of the encoded bytes: the prefix cache's key for this image."""


def decode_image(data: bytes, limits: ImageLimits) -> DecodedImage:
    """``data`` (PNG, JPEG, ...) -> an RGB image; ImageError past the limits or when it is no image.

    The size is read from the header before the pixels are decoded, so a small file that claims a
    huge canvas (a decompression bomb) is refused without allocating it."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ImageError(f"the image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                pixels = width * height
                raise ImageError(
                    f"the image is {width}x{height} ({pixels} pixels); the limit is {limits.max_pixels}"
                )
            image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"not a readable image: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"refused as a decompression bomb: {exc}") from None
    return DecodedImage(image.convert("RGB"), hashlib.sha256(data).hexdigest())


def load_image_processor(base_path: Path) -> Any:
    """The base's image processor (its ``preprocessor_config.json``), as transformers' PIL
    implementation: the same resize, rescale, normalize and patching without torchvision."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(base_path))


def preprocess_images(
    processor: Any, images: list[Image.Image]
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """-> (pixel_values [patches, dim] float32, per image its (t, h, w) patch grid)."""
    out = processor(images=images, return_tensors="pt")
    grids = [(int(t), int(h), int(w)) for t, h, w in out["image_grid_thw"].tolist()]
    return out["pixel_values"], grids


def expand_image_pads(ids: list[int], pad_id: int, counts: list[int]) -> list[int]:
    """Each image's one pad token in ``ids`` -> ``counts[i]`` of them; ValueError when the prompt's
    pad tokens are not one per image (text that spells the placeholder itself, say)."""
    found = sum(1 for t in ids if t == pad_id)
    if found != len(counts):
        raise ValueError(f"the prompt holds {found} image placeholders for {len(counts)} images")
    out: list[int] = []
    pending = iter(counts)
    for t in ids:
        out.extend([pad_id] * next(pending) if t == pad_id else [t])
    return out
