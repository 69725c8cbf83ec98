"""lorayard.vision: images decoded within limits (a decompression bomb refused from its header, before
any pixel is allocated), each image's placeholder expanded to its pad tokens, and a hub checkpoint's
processor files read as transformers reads them."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch

from lorayard.testing.shapes import png_bytes, shape_image
from lorayard.vision import (
    ImageError,
    ImageLimits,
    decode_image,
    expand_image_pads,
    load_image_processor,
    preprocess_images,
)


def _claiming(width: int, height: int) -> bytes:
    """A real 24x24 PNG whose header claims a width x height canvas (its CRC fixed): what a decompression
    bomb looks like before its pixels are inflated."""
    data = bytearray(png_bytes(shape_image("red", "square", (24, 24))))
    ihdr = 8 + 4  # after the signature and the chunk's length
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_a_bomb_is_refused_from_its_header():
    # Past our limit (4096 x 4096 by default): refused by ours, from the header.
    with pytest.raises(ImageError, match="5000x5000"):
        decode_image(_claiming(5000, 5000), ImageLimits())
    # Far past it: PIL refuses it already while opening it.
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(_claiming(1_000_000, 1_000_000), ImageLimits())


def test_limits_and_junk():
    data = png_bytes(shape_image("red", "circle", (64, 64)))
    assert decode_image(data, ImageLimits()).image.size == (64, 64)
    with pytest.raises(ImageError, match="pixels"):
        decode_image(data, ImageLimits(max_pixels=63 * 64))
    with pytest.raises(ImageError, match="bytes"):
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(b"GIF89a-not-really", ImageLimits())
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(_claiming(64, 64), ImageLimits())  # pixels for 24x24 only: truncated


def test_same_bytes_same_hash():
    data = png_bytes(shape_image("red", "circle"))
    other = png_bytes(shape_image("green", "circle"))
    assert decode_image(data, ImageLimits()).sha256 == decode_image(data, ImageLimits()).sha256
    assert decode_image(data, ImageLimits()).sha256 != decode_image(other, ImageLimits()).sha256


def test_placeholders_expand_one_per_image():
    assert expand_image_pads([1, 9, 2, 9, 3], 9, [2, 3]) == [1, 9, 9, 2, 9, 9, 9, 3]
    with pytest.raises(ValueError, match="3 image placeholders for 2 images"):
        expand_image_pads([9, 9, 9], 9, [1, 1])


CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
HUB_PROCESSOR_FILES = {
    # Qwen2.5-VL-*-Instruct on the hub: the legacy min_pixels / max_pixels fields, CLIP's normalization.
    "qwen2_5_vl": {
        "preprocessor_config.json": {
            "min_pixels": 3136,
            "max_pixels": 12845056,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
        }
    },
    # Qwen3-VL-*-Instruct on the hub: a size dict, 16-pixel patches, 0.5 normalization.
    "qwen3_vl": {
        "preprocessor_config.json": {
            "size": {"longest_edge": 16777216, "shortest_edge": 65536},
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "processor_class": "Qwen3VLProcessor",
            "image_processor_type": "Qwen2VLImageProcessorFast",
        }
    },
    # A Qwen3-VL checkpoint saved by transformers 5: the image processor nested in processor_config.json.
    "qwen3_vl-processor_config": {
        "processor_config.json": {
            "image_processor": {
                "do_convert_rgb": True,
                "do_normalize": True,
                "do_rescale": True,
                "do_resize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "image_processor_type": "Qwen2VLImageProcessor",
                "merge_size": 2,
                "patch_size": 16,
                "resample": 3,
                "rescale_factor": 0.00392156862745098,
                "size": {"longest_edge": 16777216, "shortest_edge": 65536},
                "temporal_patch_size": 2,
            },
            "processor_class": "Qwen3VLProcessor",
        }
    },
}


@pytest.mark.parametrize("layout", sorted(HUB_PROCESSOR_FILES))
def test_a_hub_checkpoints_processor_files_give_transformers_pixels(layout, tmp_path):
    """A base folder laid out as the hub's checkpoints are (their processor files, field names and
    values) is read by our loader as transformers' own AutoImageProcessor reads it: the same pixels,
    grids and image-token counts, with the file's patch size, normalization and resize bounds."""
    from transformers import AutoImageProcessor

    for name, content in HUB_PROCESSOR_FILES[layout].items():
        (tmp_path / name).write_text(json.dumps(content))
    fields = next(iter(HUB_PROCESSOR_FILES[layout].values()))
    fields = fields.get("image_processor", fields)
    ours = load_image_processor(tmp_path)
    reference = AutoImageProcessor.from_pretrained(tmp_path)
    assert ours.patch_size == fields["patch_size"] and list(ours.image_mean) == fields["image_mean"]
    # One image under the smallest size (scaled up to it), one wide, one tall.
    images = [
        shape_image("red", "square", (40, 30)),
        shape_image("blue", "circle", (300, 120)),
        shape_image("green", "triangle", (90, 260)),
    ]
    pixels, grids = preprocess_images(ours, images)
    expected = reference(images=images, return_tensors="pt")
    assert grids == [tuple(g) for g in expected["image_grid_thw"].tolist()]
    assert torch.equal(pixels, expected["pixel_values"])
    low = fields.get("min_pixels") or fields["size"]["shortest_edge"]
    _, h, w = grids[0]  # the small image, scaled up to the file's lower bound
    assert (h * w * fields["patch_size"] ** 2) >= low
    assert expected["pixel_values"].shape[1] == 3 * 2 * fields["patch_size"] ** 2  # channels x t x patch
