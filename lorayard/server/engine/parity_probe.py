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

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lorayard.architectures import UnsupportedArchitecture, architecture_for
from lorayard.server.engine.block_pool import BlockSpec, KVBlockStorage
from lorayard.server.engine.model_runner import ModelRunner, PassRow

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
    tokens = probe_tokens(int(config.vocab_size))
    with torch.inference_mode():
        reference = model(torch.tensor([tokens], device=runner.device), use_cache=False).logits[0].float()

    def last_logits(start: int, end: int) -> torch.Tensor:
        (logits,) = runner.forward([PassRow(tokens[start:end], start, _BLOCKS, None)])
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
    )


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
