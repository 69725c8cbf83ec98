"""The sampler on hand-made logits: each rule against its definition, logprobs against log_softmax."""

import math

import pytest
import torch

from lorayard.server.engine.sampler import (
    TOP_P_CANDIDATES,
    SampledToken,
    SequenceState,
    draw,
    greedy_tokens,
    sample_row,
    top_k_top_p,
)
from lorayard.server.engine.types import SamplingParams

EOS = frozenset({3})


def sample(logits: torch.Tensor, states: list[SequenceState], eos: frozenset[int]) -> list[SampledToken]:
    """A batch as the engine samples it: one argmax for the plain rows, sample_row for the others."""
    fast = greedy_tokens(logits, states)
    rows = zip(fast, states, strict=True)
    return [t if t is not None else sample_row(logits[i], s, eos) for i, (t, s) in enumerate(rows)]


def _state(prompt=(0,), output=(), **params) -> SequenceState:
    state = SequenceState.create(SamplingParams(max_tokens=16, **params), list(prompt))
    state.output_ids.extend(output)
    return state


def _draws(logits: torch.Tensor, state: SequenceState, n: int = 400) -> set[int]:
    return {sample_row(logits, state, EOS).token_id for _ in range(n)}


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    logits = torch.tensor([0.5, 2.0, -1.0, 1.5, 0.0])
    token = sample_row(logits, _state(temperature=0.0, logprobs=2), EOS)
    reference = torch.log_softmax(logits, dim=-1)
    assert token.token_id == 1
    assert token.logprob == pytest.approx(float(reference[1]))
    assert [t.token_id for t in token.top_logprobs] == [1, 3]
    assert [t.logprob for t in token.top_logprobs] == pytest.approx(reference[[1, 3]].tolist())


def test_logprobs_follow_the_temperature():
    logits = torch.tensor([1.0, 2.0, 3.0, 0.0])
    token = sample_row(logits, _state(temperature=0.5, seed=0, logprobs=0), EOS)
    assert token.logprob == pytest.approx(float(torch.log_softmax(logits / 0.5, dim=-1)[token.token_id]))
    assert token.top_logprobs == ()


def test_no_logprobs_unless_asked():
    token = sample_row(torch.tensor([0.0, 1.0]), _state(temperature=0.0), EOS)
    assert token.logprob is None and token.top_logprobs == ()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([2.0, -1.0, 1.5, 0.2, -0.5])
    # token 0 in the prompt, token 1 in the output; 2..4 unseen
    token = sample_row(
        logits, _state(prompt=[0], output=[1], temperature=0.0, repetition_penalty=2.0, logprobs=5), EOS
    )
    penalized = torch.tensor([1.0, -2.0, 1.5, 0.2, -0.5])
    assert token.token_id == 2
    assert token.logprob == pytest.approx(float(torch.log_softmax(penalized, dim=-1)[2]))
    expected = dict(enumerate(torch.log_softmax(penalized, dim=-1).tolist()))
    for top in token.top_logprobs:
        assert top.logprob == pytest.approx(expected[top.token_id])


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.tensor([2.0, 1.9, 0.0, 0.0, 0.0])
    # the prompt's token 1 is not penalized; output token 0 twice: 2.0 - 0.05 - 2 * 0.1 = 1.75 < 1.9
    state = _state(
        prompt=[1, 1],
        output=[0, 0],
        temperature=0.0,
        presence_penalty=0.05,
        frequency_penalty=0.1,
        logprobs=1,
    )
    token = sample_row(logits, state, EOS)
    penalized = torch.tensor([1.75, 1.9, 0.0, 0.0, 0.0])
    assert token.token_id == 1
    assert token.logprob == pytest.approx(float(torch.log_softmax(penalized, dim=-1)[1]))


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5])
    state = _state(temperature=1.0, top_k=2, seed=0)
    assert _draws(logits, state) == {1, 4}
    token = sample_row(logits, _state(temperature=1.0, top_k=2, seed=0, logprobs=5), EOS)
    kept = torch.log_softmax(torch.tensor([3.0, 2.5]), dim=-1)
    tops = {t.token_id: t.logprob for t in token.top_logprobs}
    assert tops[1] == pytest.approx(float(kept[0]))
    assert tops[4] == pytest.approx(float(kept[1]))
    assert set(tops) == {1, 4}  # tokens top-k ruled out are no alternatives


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    # mass before token 2 is 0.8 >= 0.7: tokens 2 and 3 go; before token 1 it is 0.5 < 0.7: it stays
    assert _draws(logits, _state(temperature=1.0, top_p=0.7, seed=1)) == {0, 1}
    token = sample_row(logits, _state(temperature=1.0, top_p=0.7, seed=1, logprobs=2), EOS)
    renormalized = {0: math.log(0.5 / 0.8), 1: math.log(0.3 / 0.8)}
    assert token.logprob == pytest.approx(renormalized[token.token_id], abs=1e-5)


def test_a_tiny_top_p_still_keeps_the_best_token():
    logits = torch.tensor([0.0, 1.0, 0.5])
    assert _draws(logits, _state(temperature=1.0, top_p=1e-9, seed=2), n=50) == {1}


def _sorted_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """top-p by its definition over the whole vocabulary, sorted, in float64: the kept tokens' mask."""
    ordered, order = torch.sort(logits.double(), descending=True)
    probs = torch.softmax(ordered, dim=-1)
    drop = (probs.cumsum(-1) - probs) >= top_p
    drop[0] = False
    return torch.zeros_like(drop).scatter(0, order, ~drop)


@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])
@pytest.mark.parametrize("top_p", [0.1, 0.9, 0.99])
def test_top_p_over_a_large_vocabulary_keeps_what_the_full_sort_keeps(scale, top_p):
    # Peaked logits (scale 8) reach top_p within the first TOP_P_CANDIDATES tokens; flat ones do not,
    # and top-p sorts the whole vocabulary: both must keep exactly the definition's set.
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    state = _state(temperature=1.0, top_p=top_p, logprobs=0)
    token = sample_row(logits, state, EOS)
    assert token.logprob is not None and math.isfinite(token.logprob)
    kept = torch.isfinite(top_k_top_p(logits, 0, top_p))
    assert torch.equal(kept, _sorted_top_p(logits, top_p))
    assert int(kept.sum()) >= 1 and (scale < 8 or int(kept.sum()) <= TOP_P_CANDIDATES)


def test_draw_follows_the_probabilities_and_never_draws_a_zero():
    probs = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.0])
    generator = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.tensor([draw(probs, generator) for _ in range(20000)]), minlength=7)
    assert counts[[0, 2, 6]].tolist() == [0, 0, 0]
    # 20000 draws: each share within 0.015 of its probability (over 4 standard deviations)
    assert (counts / 20000 - probs).abs().max() < 0.015


def test_draw_never_passes_the_last_token_with_mass():
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([1e-30, 1.0, 0.0])  # the draw lands in token 1 or (rarely) 0, never 2
    assert {draw(probs, generator) for _ in range(2000)} <= {0, 1}


def test_top_k_and_top_p_combine():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # top_k 3 renormalizes to 0.5/0.95, 0.3/0.95, 0.15/0.95; top_p 0.5 then keeps the first only
    assert _draws(logits, _state(temperature=1.0, top_k=3, top_p=0.5, seed=3), n=100) == {0}


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([0.0, 0.0, 1.0, 5.0, 4.0])  # eos (3) is the best, stop id 4 the next
    params = {"temperature": 0.0, "min_tokens": 2, "stop_token_ids": frozenset({4})}
    assert sample_row(logits, _state(**params), EOS).token_id == 2
    assert sample_row(logits, _state(output=[2], **params), EOS).token_id == 2
    assert sample_row(logits, _state(output=[2, 2], **params), EOS).token_id == 3


def test_min_tokens_routes_an_all_greedy_batch_through_the_row_path():
    logits = torch.tensor([[0.0, 1.0, 0.0, 5.0], [0.0, 1.0, 0.0, 5.0]])
    plain, held = _state(temperature=0.0), _state(temperature=0.0, min_tokens=1)
    assert [t.token_id for t in sample(logits, [plain, held], EOS)] == [3, 1]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))

    def run(seed: int) -> list[int]:
        state = _state(temperature=1.0, seed=seed)
        return [sample_row(logits, state, EOS).token_id for _ in range(30)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_seeded_rows_do_not_disturb_each_other():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    alone = _state(temperature=1.0, seed=5)
    expected = [sample(logits[:1], [alone], EOS)[0].token_id for _ in range(10)]
    together = _state(temperature=1.0, seed=5)
    other = _state(temperature=1.0, seed=6)
    got = [sample(logits, [together, other], EOS)[0].token_id for _ in range(10)]
    assert got == expected


def test_all_greedy_batch_is_one_argmax_per_row():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 4.0]])
    states = [_state(temperature=0.0) for _ in range(3)]
    assert [t.token_id for t in sample(logits, states, EOS)] == [1, 0, 2]


def test_sample_row_does_not_modify_the_logits():
    logits = torch.tensor([2.0, -1.0, 1.0])
    before = logits.clone()
    sample_row(logits, _state(output=[0], temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0), EOS)
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    "probs", [[0.5, float("nan")], [float("inf"), 0.1], [0.0, 0.0]], ids=["nan", "inf", "zero"]
)
def test_draw_refuses_what_is_not_a_distribution(probs):
    with pytest.raises(RuntimeError, match="cannot sample a token"):
        draw(torch.tensor(probs), None)
