"""A vision-language request's prompt as the model runner needs it: the vision tower's embeddings for
its image-pad tokens and its multimodal rotary (M-RoPE) positions.

Both come from transformers' own code on the loaded base: the embeddings from the model's vision tower
(``get_image_features``: the HF ``visual`` module, patch merger included), the positions from its
``get_rope_index`` (image tokens get 3-D t/h/w positions; text after an image continues from the
image's largest position, so a token at sequence index i >= the prompt's length sits at ``i + delta``).
Computed once per request, on the engine thread, the first time one of its passes is planned; a
preempted request keeps it (its recompute needs the same embeddings and positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorayard.server.engine.model_runner import ImageEmbeds
from lorayard.server.engine.types import ImageInputs, InvalidRequest


@dataclass(frozen=True)
class VisionPrompt:
    positions: torch.Tensor
    """[3, prompt length] M-RoPE positions of the prompt (host, int64)."""
    delta: int
    """Positions of tokens past the prompt: their sequence index plus this."""
    pad_at: torch.Tensor
    """[k] prompt indices of the image-pad tokens, in order (host, int64)."""
    embeds: torch.Tensor
    """[k, hidden] the vision tower's output for them (the model's device and dtype)."""
    deepstack: tuple[torch.Tensor, ...] = ()
    """Qwen3-VL: per early decoder layer, [k, hidden] features of intermediate vision blocks that
    layer's output adds at the image positions; () for Qwen2.5-VL."""

    def mrope(self, start: int, n: int) -> torch.Tensor:
        """[3, n] positions of sequence indices ``start .. start + n - 1``."""
        prompt_len = self.positions.shape[1]
        inside = self.positions[:, start : min(start + n, prompt_len)]
        after = torch.arange(max(start, prompt_len), max(start + n, prompt_len)) + self.delta
        return torch.cat((inside, after.expand(3, -1)), dim=1)

    def embeds_for(self, start: int, n: int) -> ImageEmbeds | None:
        """The image-pad tokens among the n tokens from ``start``: their indices there, embeddings and
        deepstack features; None when there is none."""
        wanted = (self.pad_at >= start) & (self.pad_at < start + n)
        if not bool(wanted.any()):
            return None
        on_device = wanted.to(self.embeds.device)
        deepstack = tuple(layer[on_device] for layer in self.deepstack)
        return ImageEmbeds(self.pad_at[wanted] - start, self.embeds[on_device], deepstack)


def image_token_count(grid_thw: tuple[int, int, int], merge_size: int) -> int:
    """Image-pad tokens one image takes: its patches, merged ``merge_size`` x ``merge_size``."""
    t, h, w = grid_thw
    return t * h * w // (merge_size * merge_size)


def check_images(config: Any, prompt_ids: list[int], images: ImageInputs | None) -> None:
    """The engine's guard for a vision-language base: the prompt's image-pad tokens are exactly the
    images' (none without images), and the pixel rows are the grids' patches. InvalidRequest otherwise."""
    image_token = int(config.image_token_id)
    pads = sum(1 for t in prompt_ids if t == image_token)
    if images is None:
        if pads:
            raise InvalidRequest(
                f"the prompt holds {pads} image-pad tokens and no image: send images as image parts",
                "prompt_ids",
            )
        return
    merge = int(config.vision_config.spatial_merge_size)
    expected = sum(image_token_count(g, merge) for g in images.grid_thw)
    if pads != expected:
        raise InvalidRequest(
            f"the prompt holds {pads} image-pad tokens; its {len(images.grid_thw)} images take {expected}",
            "prompt_ids",
        )
    patches = sum(t * h * w for t, h, w in images.grid_thw)
    if images.pixel_values.ndim != 2 or images.pixel_values.shape[0] != patches:
        raise InvalidRequest(
            f"pixel_values has shape {tuple(images.pixel_values.shape)}; the grids hold {patches} patches",
            "images",
        )


@torch.inference_mode()
def encode_prompt(model: Any, prompt_ids: list[int], images: ImageInputs) -> VisionPrompt:
    """Run the base's vision tower over ``images`` and its ``get_rope_index`` over the prompt."""
    ids = torch.tensor([prompt_ids])
    pad = ids == int(model.config.image_token_id)
    grid = torch.tensor(images.grid_thw, dtype=torch.long)
    device = next(model.parameters()).device
    positions, delta = model.model.get_rope_index(
        ids, mm_token_type_ids=pad.int(), image_grid_thw=grid, attention_mask=torch.ones_like(ids)
    )
    output = model.model.get_image_features(images.pixel_values.to(device), grid.to(device), return_dict=True)
    deepstack = getattr(output, "deepstack_features", None) or []
    return VisionPrompt(
        positions=positions[:, 0].cpu(),
        delta=int(delta.reshape(-1)[0]),
        pad_at=pad[0].nonzero()[:, 0],
        embeds=torch.cat(list(output.pooler_output)).to(model.dtype),
        deepstack=tuple(torch.cat(list(layer)).to(model.dtype) for layer in deepstack),
    )
