"""The startup parity probe for ``--engine vllm``: vLLM's forward on the loaded base against one HF
forward (no vLLM import: engine.py runs the probe request and hands its logprobs here).

The native engine's probe (:mod:`lorayard.server.engine.parity_probe`) compares our runner's logits
with transformers'. vLLM reports logprobs, not logits, so this one compares those: the same fixed
tokens (``probe_tokens``) go through the running engine as a prompt with prompt logprobs, then
:data:`DECODE_STEPS` greedy steps with logprobs; one HF forward over the prompt and vLLM's greedy
tokens is the reference. Every logprob vLLM reports (each position's token and its top
:data:`PROBE_TOP` alternatives) must be within the dtype's tolerance of transformers' (the native
probe's :data:`TOLERANCE`, relative to the largest HF logit), and every greedy token must be HF's
argmax or tied with it within that tolerance. A miss refuses the base
(:class:`~lorayard.architectures.UnsupportedArchitecture` naming the architecture, the position, the
token and both values): a config field one of them reads and the other ignores, or a model class vLLM
implements differently, must never answer silently.

The reference is a second copy of the weights, on the CPU (a GPU's memory is vLLM's), freed after the
probe. ``--parity-probe auto`` (the default) runs it when that copy fits in half the memory the machine
has available once vLLM has started, and otherwise logs that it skipped it and why; a 70B base on GPUs
is the case it skips. ``on`` runs it whatever the size, ``off`` never.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lorayard.architectures import UnsupportedArchitecture
from lorayard.base_model import ResolvedBaseModel, load_base_model
from lorayard.server.engine.parity_probe import TOLERANCE

log = logging.getLogger("lorayard.engine_vllm")

ProbeMode = Literal["auto", "on", "off"]
DECODE_STEPS = 4
"""Greedy steps after the probe's prompt: vLLM's decode path (its KV cache read back) is checked too."""
PROBE_TOP = 5
"""Alternatives per position whose logprobs are compared besides the position's own token."""
MEMORY_SHARE = 0.5
"""--parity-probe auto: the HF copy may take at most this share of the memory available."""


@dataclass(frozen=True)
class ProbeObservation:
    """What vLLM answered for the probe: the prompt, its greedy tokens and their logprobs."""

    prompt: Sequence[int]
    generated: Sequence[int]
    logprobs: Sequence[Mapping[int, float]]
    """One ``{token: logprob}`` per position from 1 on, over prompt + generated: the position's own
    token and the top alternatives vLLM reported for it (positions 1 .. len(prompt) are the prompt
    logprobs, the rest the decode steps')."""

    @property
    def tokens(self) -> list[int]:
        return [*self.prompt, *self.generated]


@dataclass(frozen=True)
class ProbeMiss:
    position: int
    token: int
    ours: float
    """vLLM's logprob of ``token`` at ``position`` (a greedy miss: HF's logprob of vLLM's token)."""
    reference: float
    """transformers' logprob of it (a greedy miss: HF's best logprob there)."""
    greedy: bool = False
    """vLLM's greedy token is not HF's argmax (nor tied with it)."""

    def describe(self) -> str:
        if self.greedy:
            return (
                f"vLLM's greedy token {self.token} has logprob {self.ours:.4g} in transformers, whose best "
                f"there has {self.reference:.4g}"
            )
        return (
            f"token {self.token}'s logprob is {self.ours:.4g} in vLLM, {self.reference:.4g} in transformers"
        )


@dataclass(frozen=True)
class ProbeResult:
    architecture: str
    max_difference: float
    """max |vLLM - HF| over every compared logprob, relative to the largest HF logit (at least 1)."""
    tolerance: float
    miss: ProbeMiss | None
    """The worst comparison (a greedy token that is not HF's argmax first), None when all passed."""

    @property
    def ok(self) -> bool:
        return self.miss is None


def compare(observation: ProbeObservation, logits: torch.Tensor, architecture: str) -> ProbeResult:
    """Compare vLLM's probe answer with HF's ``logits`` over ``observation.tokens``.

    ``logits``: [len(tokens), vocab] in the probe's dtype, from one HF forward.
    """
    scale = max(float(logits.float().abs().max()), 1.0)
    tolerance = TOLERANCE.get(logits.dtype, 0.1)
    reference = torch.log_softmax(logits.float(), dim=-1)  # [tokens, vocab]
    miss: ProbeMiss | None = None
    for step, token in enumerate(observation.generated):
        row = reference[len(observation.prompt) + step - 1]  # [vocab]: the position that chose it
        if float(row.max() - row[token]) / scale > tolerance:
            miss = ProbeMiss(len(observation.prompt) + step, token, float(row[token]), float(row.max()), True)
            break
    worst = 0.0
    worst_at: ProbeMiss | None = None
    for position, entry in enumerate(observation.logprobs, start=1):
        for token, logprob in entry.items():
            expected = float(reference[position - 1, token])
            difference = _difference(logprob, expected) / scale
            if difference > worst:
                worst, worst_at = difference, ProbeMiss(position, token, logprob, expected)
    if miss is None and worst > tolerance:
        miss = worst_at
    return ProbeResult(architecture, worst, tolerance, miss)


def _difference(ours: float, reference: float) -> float:
    if math.isinf(ours) and math.isinf(reference) and ours == reference:
        return 0.0
    return abs(ours - reference)


def reference_logits(base: ResolvedBaseModel, tokens: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """One HF forward over ``tokens`` on the CPU in ``dtype`` (the base loaded as the native engine and
    the training job load it): logits [len(tokens), vocab]. The copy is freed before this returns."""
    model = load_base_model(base, device="cpu", dtype=dtype)
    try:
        model.eval()
        with torch.inference_mode():
            return model(torch.tensor([list(tokens)]), use_cache=False).logits[0].clone()
    finally:
        del model
        gc.collect()


def check_parity(
    observation: ProbeObservation, base: ResolvedBaseModel, dtype: torch.dtype, architecture: str
) -> ProbeResult:
    """:func:`compare` against a fresh HF forward, raising UnsupportedArchitecture on a miss."""
    result = compare(observation, reference_logits(base, observation.tokens, dtype), architecture)
    miss = result.miss
    if miss is not None:
        raise UnsupportedArchitecture(
            f"base architecture {architecture!r}: vLLM's forward disagrees with transformers' on this base "
            f"at probe position {miss.position}: {miss.describe()} (largest logprob difference "
            f"{result.max_difference:.3g} of the largest logit, tolerance {result.tolerance:g}); refusing to "
            "serve it rather than answer wrongly (--parity-probe off skips this check)"
        )
    return result


def reference_bytes(base: Path, dtype: torch.dtype) -> int:
    """The HF copy's weights in ``dtype``: parameters counted from the safetensors headers (no weight
    read), else the checkpoint files' size."""
    from safetensors import safe_open

    files = sorted(base.glob("*.safetensors"))
    if not files:
        return sum(f.stat().st_size for f in base.glob("*.bin"))
    count = 0
    for file in files:
        with safe_open(str(file), "pt") as handle:
            names = handle.keys()  # safetensors' handle is no mapping: it cannot iterate
            count += sum(math.prod(handle.get_slice(name).get_shape()) for name in names)
    return count * dtype.itemsize


def available_memory() -> int:
    """Bytes the kernel says a new allocation can have (MemAvailable), else free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def skip_reason(mode: ProbeMode, base: Path, dtype: torch.dtype) -> str | None:
    """Why the probe does not run under ``mode`` (None: it runs)."""
    if mode == "off":
        return "--parity-probe off"
    if mode == "on":
        return None
    needed, available = reference_bytes(base, dtype), available_memory()
    if needed > MEMORY_SHARE * available:
        return (
            f"its HF copy of the weights ({needed / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}) "
            f"is more than {MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB available "
            "(--parity-probe on runs it anyway)"
        )
    return None
