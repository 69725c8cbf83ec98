"""The --engine vllm parity probe's comparison and its memory rule, without vLLM: the observation here
is what transformers itself answers on the tiny base (vLLM's own answers are compared in
tests/integration/server/test_vllm_engine.py, on the embedded base, a tiny one, and one refused)."""

from __future__ import annotations

import pytest
import torch

from lorayard.architectures import UnsupportedArchitecture
from lorayard.server.engine.parity_probe import probe_tokens
from lorayard.server.engine_vllm.parity_probe import (
    DECODE_STEPS,
    PROBE_TOP,
    ProbeObservation,
    check_parity,
    compare,
    reference_bytes,
    reference_logits,
    skip_reason,
)


def observe(logits_of, vocab_size: int) -> ProbeObservation:
    """What an engine computing ``logits_of(tokens)`` answers: greedy steps, then every position's
    own token and top alternatives with their logprobs."""
    prompt = probe_tokens(vocab_size)
    tokens = list(prompt)
    for _ in range(DECODE_STEPS):
        tokens.append(int(logits_of(tokens)[-1].argmax()))
    logprobs = torch.log_softmax(logits_of(tokens).float(), dim=-1)
    entries = []
    for position in range(1, len(tokens)):
        row = logprobs[position - 1]
        top = row.topk(PROBE_TOP).indices.tolist()
        entries.append({token: float(row[token]) for token in {tokens[position], *top}})
    return ProbeObservation(prompt, tokens[len(prompt) :], entries)


@pytest.fixture(scope="module")
def hf_logits(tiny_base):
    def logits_of(tokens: list[int]) -> torch.Tensor:
        return reference_logits(tiny_base, tokens, torch.float32)

    return logits_of


@pytest.fixture(scope="module")
def observation(hf_logits, tiny_base) -> ProbeObservation:
    from transformers import AutoConfig

    return observe(hf_logits, int(AutoConfig.from_pretrained(tiny_base.path).vocab_size))


def test_an_engine_computing_what_transformers_computes_passes(observation, tiny_base):
    result = check_parity(observation, tiny_base, torch.float32, "llama")
    assert result.ok and result.max_difference < 1e-5 and result.tolerance == 1e-3
    assert len(observation.logprobs) == len(observation.tokens) - 1


def test_scaled_logits_are_refused_naming_the_position_and_both_logprobs(observation, hf_logits):
    """What a config field read by one side only does (vLLM's Llama reads ``logit_scale``, HF's not)."""
    logits = hf_logits(observation.tokens) * 1.5
    result = compare(observation, logits, "llama")
    assert not result.ok and result.max_difference > 100 * result.tolerance
    miss = result.miss
    assert miss is not None and not miss.greedy and 1 <= miss.position < len(observation.tokens)
    assert f"{miss.ours:.4g} in vLLM" in miss.describe()
    expected = torch.log_softmax(logits.float(), dim=-1)[miss.position - 1, miss.token]
    assert miss.reference == pytest.approx(float(expected))


def test_a_greedy_token_that_is_not_transformers_argmax_is_refused_first(observation, hf_logits, tiny_base):
    logits = hf_logits(observation.tokens)
    at = len(observation.prompt)
    worst = int(logits[at - 1].argmin())
    wrong = ProbeObservation(observation.prompt, [worst, *observation.generated[1:]], observation.logprobs)
    miss = compare(wrong, logits, "llama").miss
    assert miss is not None and miss.greedy and (miss.position, miss.token) == (at, worst)
    with pytest.raises(UnsupportedArchitecture, match=f"'llama'.*probe position {at}: vLLM's greedy token"):
        check_parity(wrong, tiny_base, torch.float32, "llama")


def test_auto_runs_the_probe_when_the_copy_fits_and_on_off_decide_alone(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_base_dir).parameters())
    # Tied embeddings are one tensor in the checkpoint and in the model alike.
    assert reference_bytes(tiny_base_dir, torch.float32) == 4 * parameters
    assert reference_bytes(tiny_base_dir, torch.bfloat16) == 2 * parameters
    assert skip_reason("auto", tiny_base_dir, torch.float32) is None
    assert skip_reason("on", tiny_base_dir, torch.float32) is None
    assert skip_reason("off", tiny_base_dir, torch.float32) == "--parity-probe off"
