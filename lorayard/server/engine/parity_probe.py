"""The startup parity probe: our model runner against the HF model's own forward, on the loaded base.

A hand-written forward must never be the only thing between an architecture and a wrong answer. The
spec in :mod:`lorayard.architectures` says how a listed architecture differs from Llama; this probe
checks, on the actual weights and config, that the runner computes what transformers computes:
a fixed token sequence is prefilled in two chunks and then decoded one token at a time, and every
position's logits are compared with one HF forward over the whole sequence. With a static decode
step (``--decode-mode static|graph``) the decode positions go through that step (run eagerly), so
the step a CUDA graph replays is checked too. The server runs it
before it reports ready, the training job before it trains; a difference beyond the dtype's tolerance
refuses the base (:class:`~lorayard.architectures.UnsupportedArchitecture`, naming the architecture
and the difference).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lorayard.architectures import UnsupportedArchitecture, architecture_for, language_config
from lorayard.server.engine.block_pool import BlockSpec, KVBlockStorage
from lorayard.server.engine.model_runner import ModelRunner, PassRow
from lorayard.server.engine.types import ImageInputs
from lorayard.server.engine.vision import encode_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PROBE_LENGTH = 16
"""Tokens in the probe: two prefill chunks of 5, then one decode step for each of the rest."""
_FIRST_CHUNK, _SECOND_CHUNK = 5, 10
_BLOCK_SIZE = 4
_BLOCKS = [3, 1, 0, 2]
"""The probe's block table: out of order, so reading and writing through the table is checked too."""

TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.1}
"""Largest logit difference accepted, relative to the largest logit (at least 1). A forward that gets
an architecture wrong (a missing norm offset, q/k norm, bias or soft cap) is off by the order of the
logits themselves; rounding in half precision stays well under a tenth of them."""


@dataclass(frozen=True)
class ProbeResult:
    model_type: str
    max_difference: float
    """max |ours - HF| over every probed position, relative to the largest HF logit (at least 1)."""
    tolerance: float
    static_decode_steps: int = 0
    """Decode positions that went through the runner's static decode step (0: all packed)."""
    image_tokens: int = 0
    """A vision-language base's probe holds an image: its image-pad tokens (0: text only)."""

    @property
    def ok(self) -> bool:
        return self.max_difference <= self.tolerance


def probe_tokens(vocab_size: int) -> list[int]:
    """A fixed, spread-out token sequence inside any vocabulary."""
    return [(i * 7919 + 13) % vocab_size for i in range(PROBE_LENGTH)]


def probe_runner(model: PreTrainedModel, runner: ModelRunner | None = None) -> ProbeResult:
    """Compare ``runner`` (default: a fresh runner over ``model``) with ``model``'s forward.

    The probe runs over a few KV blocks of its own (the runner's weights and choices, not its cache).
    UnsupportedArchitecture for a base that no spec lists (before anything runs).
    """
    architecture_for(model.config)
    config = model.config
    spec = BlockSpec.of_model(config, model.dtype, _BLOCK_SIZE)
    # One block past the table's: the static decode step's scratch block (padded rows write there).
    storage = KVBlockStorage(spec, len(_BLOCKS) + 1, runner_device(model))
    if runner is None:
        runner = ModelRunner(model, storage, fuse_linears=False)
    else:
        runner = runner.over(storage, max_model_len=len(_BLOCKS) * _BLOCK_SIZE)
    tokens = probe_tokens(int(language_config(config).vocab_size))
    images = vision = None
    extra: dict[str, torch.Tensor] = {}
    if runner.arch.vision:
        tokens, images = _image_probe(model, tokens)
        # The first two chunks are the "prompt": the decode steps after it run at its M-RoPE offset.
        vision = encode_prompt(model, tokens[:_SECOND_CHUNK], images)
        ids = torch.tensor([tokens])
        extra = {
            "pixel_values": images.pixel_values.to(runner.device),
            "image_grid_thw": torch.tensor(images.grid_thw, device=runner.device),
            "mm_token_type_ids": (ids == int(config.image_token_id)).int().to(runner.device),
        }
    with torch.inference_mode():
        reference = (
            model(torch.tensor([tokens], device=runner.device), use_cache=False, **extra).logits[0].float()
        )

    def last_logits(start: int, end: int) -> torch.Tensor:
        row = PassRow(tokens[start:end], start, _BLOCKS, None)
        if vision is not None:
            row = dataclasses.replace(
                row,
                mrope=vision.mrope(start, end - start),
                image_embeds=vision.embeds_for(start, end - start),
            )
        (logits,) = runner.forward([row])
        assert logits is not None
        return logits[-1]

    ours = {
        _FIRST_CHUNK - 1: last_logits(0, _FIRST_CHUNK),
        _SECOND_CHUNK - 1: last_logits(_FIRST_CHUNK, _SECOND_CHUNK),
    }
    for position in range(_SECOND_CHUNK, PROBE_LENGTH):
        ours[position] = last_logits(position, position + 1)
    positions = sorted(ours)
    difference = (torch.stack([ours[p] for p in positions]) - reference[positions]).abs().max()
    scale = max(float(reference[positions].abs().max()), 1.0)
    return ProbeResult(
        str(model.config.model_type),
        float(difference) / scale,
        TOLERANCE.get(model.dtype, 0.1),
        sum(runner.static_passes.values()),
        0 if vision is None else int(vision.pad_at.numel()),
    )


def _image_probe(model: PreTrainedModel, tokens: list[int]) -> tuple[list[int], ImageInputs]:
    """The probe's tokens with one image in the first chunk, crossing into the second: text, the
    image's start marker, its pad tokens, its end marker, text; and fixed pixels for a 4x4-patch grid
    (4 pad tokens with the usual 2x2 merge)."""
    config = model.config
    vision_config = config.vision_config
    merge = int(vision_config.spatial_merge_size)
    grid = (1, 2 * merge, 2 * merge)
    pads = grid[1] * grid[2] // (merge * merge)
    image = [
        int(config.vision_start_token_id),
        *[int(config.image_token_id)] * pads,
        int(config.vision_end_token_id),
    ]
    probe = [*tokens[:2], *image, *tokens[2:]][:PROBE_LENGTH]
    patch_dim = (
        int(vision_config.in_channels)
        * int(vision_config.temporal_patch_size)
        * int(vision_config.patch_size) ** 2
    )
    patches = grid[1] * grid[2]
    pixels = torch.sin(torch.arange(patches * patch_dim, dtype=torch.float32) * 0.37).reshape(
        patches, patch_dim
    )
    return probe, ImageInputs(pixels, (grid,), ("probe",))


def runner_device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def check_runner_parity(model: PreTrainedModel, runner: ModelRunner | None = None) -> ProbeResult:
    """:func:`probe_runner`, raising UnsupportedArchitecture when the runner disagrees with HF."""
    result = probe_runner(model, runner)
    if not result.ok:
        raise UnsupportedArchitecture(
            f"base architecture {result.model_type!r}: the serving engine's forward disagrees with "
            f"transformers' on this base (max logit difference {result.max_difference:.3g} of the largest "
            f"logit, tolerance {result.tolerance:g}); refusing to serve it rather than answer wrongly"
        )
    return result
