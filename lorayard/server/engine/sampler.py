"""Token selection: penalties, temperature, top-k / top-p, seeded sampling, logprobs; prompt scoring.

The greedy rows of a batch (all of them in the common serving and benchmark case) are one argmax;
rows that sample or use penalties are processed on their own, so the engine can fail one row's
sampling without touching the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lorayard.server.engine.types import PromptLogprob, SamplingParams, TopLogprob

if TYPE_CHECKING:
    from lorayard.server.engine.guided import GuidedMatcher


@dataclass
class SequenceState:
    """What the sampler must know about one running sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    """Seeded requests: created on first use, on the device of the probabilities it samples."""
    bias: tuple[torch.Tensor, torch.Tensor] | None = None
    """``logit_bias`` as (ids [n] long, values [n] float32) on the logits' device, built once."""
    guide: GuidedMatcher | None = None
    """Structured output: the grammar whose mask (filled by the engine before sampling) applies."""

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int]) -> SequenceState:
        return cls(params=params, prompt_ids=prompt_ids)

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        """The request's own generator (None unseeded): torch.rand refuses a CPU generator for a
        CUDA tensor, so it lives where the logits do."""
        if self.params.seed is None:
            return None
        if self.generator is None:  # a request's logits never change device
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.params.seed)
        return self.generator

    def bias_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bias is None:
            ids, values = zip(*self.params.logit_bias, strict=True)
            self.bias = (
                torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(values, dtype=torch.float32, device=device),
            )
        return self.bias

    @property
    def needs_processing(self) -> bool:
        p = self.params
        return (
            not p.greedy
            or p.presence_penalty != 0.0
            or p.frequency_penalty != 0.0
            or p.repetition_penalty != 1.0
            or p.logprobs is not None
            or bool(p.logit_bias)  # a biased greedy row's argmax is not the plain one
            or self.guide is not None
            or (p.min_tokens > len(self.output_ids))
        )


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()


def _apply_penalties(logits: torch.Tensor, seq: SequenceState) -> torch.Tensor:
    # Index and count tensors live where the logits do: a CPU tensor of counts subtracted from CUDA
    # logits is a device mismatch (only 0-dim CPU tensors mix with CUDA ones).
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen_ids = sorted(set(seq.prompt_ids) | set(seq.output_ids))
        seen = torch.tensor(seen_ids, dtype=torch.long, device=logits.device)
        if seen.numel():
            values = logits[seen]
            logits[seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
    if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
        output = torch.tensor(seq.output_ids, dtype=torch.long, device=logits.device)
        ids, counts = output.unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    return logits


TOP_P_CANDIDATES = 256
"""Tokens top-p looks at first: their mass usually reaches top_p, and then the rest of the vocabulary
(every token after them has at least that mass before it) is dropped without sorting it; otherwise
top-p sorts the whole vocabulary. A full sort of a 49k vocabulary took 3-4 ms per row on the CPU,
``topk`` of 256 0.3 ms (issue 30)."""


def top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [vocab] -> the same with every token top-k or top-p rules out at -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p >= 1.0:
        return logits
    total = torch.logsumexp(logits.double(), dim=-1)  # float64: the mass sums stay exact past 49k terms
    vocab = logits.shape[-1]
    best = min(TOP_P_CANDIDATES, vocab)
    while True:  # the best tokens in order, until their mass reaches top_p (or all of them)
        values, order = torch.topk(logits, best)
        probs = torch.exp(values.double() - total)
        cumulative = probs.cumsum(-1)
        if best == vocab or float(cumulative[-1]) >= top_p:
            break
        best = vocab
    # Drop tokens once the mass before them already reaches top_p; the best token always stays.
    drop = (cumulative - probs) >= top_p
    drop[0] = False  # explicitly: the best token stays, however small top_p is
    keep = order[~drop]
    kept = torch.full_like(logits, float("-inf"))
    kept[keep] = logits[keep]
    return kept


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from ``probs`` [vocab] (non-negative, not all zero), distributed as
    ``torch.multinomial(probs, 1)``: the first token whose cumulative probability exceeds a uniform
    draw in [0, total). multinomial took 1-2 ms per row over a 49k vocabulary on the CPU, this
    0.05 ms (issue 30). A token of probability 0 is never drawn: its cumulative equals the one
    before it, so it is never the first to exceed the draw.

    Raises RuntimeError (as multinomial did) when the probabilities are not a distribution: NaN or
    inf (a NaN temperature, a hostile adapter's logits) or all zero; the engine fails that row alone."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # float64: no drift over a large vocabulary
    total = cdf[-1]
    mass = float(total)
    if not math.isfinite(mass) or mass <= 0:
        raise RuntimeError(
            f"cannot sample a token: the probabilities sum to {mass}, not a finite positive mass"
        )
    u = torch.rand((), generator=generator, device=probs.device, dtype=torch.float64)
    # below total, so some cumulative exceeds it even where u * total rounds up to total
    point = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return int(torch.searchsorted(cdf, point, right=True))


def sample_row(logits: torch.Tensor, seq: SequenceState, eos_ids: frozenset[int]) -> SampledToken:
    """logits: [vocab] float32 for one row -> the chosen token (and logprobs when asked)."""
    p = seq.params
    logits = _apply_penalties(logits.clone(), seq)
    if p.logit_bias:  # OpenAI: added to the logits before sampling (so before temperature)
        ids, values = seq.bias_on(logits.device)
        logits.index_add_(0, ids, values)
    if len(seq.output_ids) < p.min_tokens:
        for token in eos_ids | p.stop_token_ids:
            logits[token] = float("-inf")
    if seq.guide is not None:
        seq.guide.apply(logits)
    if p.greedy:
        token = int(torch.argmax(logits))
        processed = logits
    else:
        processed = top_k_top_p(logits / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(processed, dim=-1)
        token = draw(probs, seq.generator_on(probs.device))
    if p.logprobs is None:
        return SampledToken(token)
    logprobs = torch.log_softmax(processed, dim=-1)
    top = torch.topk(logprobs, p.logprobs) if p.logprobs > 0 else None
    # Tokens that top-k / top-p or a grammar ruled out (-inf) are no alternatives (nor valid JSON).
    tops = (
        ()
        if top is None
        else tuple(
            TopLogprob(int(i), float(v))
            for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            if v != float("-inf")
        )
    )
    return SampledToken(token, float(logprobs[token]), tops)


def greedy_tokens(logits: torch.Tensor, seqs: list[SequenceState]) -> list[SampledToken | None]:
    """logits: [B, vocab] -> the argmax of every row that needs no processing (one batched op and one
    device read), None for the rows that :func:`sample_row` must handle one by one."""
    plain = [i for i, seq in enumerate(seqs) if not seq.needs_processing]
    tokens: list[SampledToken | None] = [None] * len(seqs)
    if not plain:
        return tokens
    rows = logits if len(plain) == len(seqs) else logits[plain]
    for i, token in zip(plain, torch.argmax(rows, dim=-1).tolist(), strict=True):
        tokens[i] = SampledToken(int(token))
    return tokens


def score_tokens(logits: torch.Tensor, targets: list[int], top: int) -> list[PromptLogprob]:
    """logits: [n, vocab] float32 with n >= len(targets); row i scores ``targets[i]``.

    Each target's logprob under the model's own distribution (no temperature, penalties or bias, as
    OpenAI's echo and vLLM's prompt_logprobs report it) and the ``top`` most likely alternatives.
    """
    if not targets:
        return []
    logprobs = torch.log_softmax(logits[: len(targets)], dim=-1)
    index = torch.tensor(targets, device=logits.device)[:, None]
    chosen = logprobs.gather(1, index)[:, 0].tolist()
    if top == 0:
        return [PromptLogprob(value) for value in chosen]
    best = torch.topk(logprobs, top, dim=-1)
    return [
        PromptLogprob(value, tuple(TopLogprob(int(i), float(v)) for v, i in zip(values, ids, strict=True)))
        for value, values, ids in zip(chosen, best.values.tolist(), best.indices.tolist(), strict=True)
    ]
