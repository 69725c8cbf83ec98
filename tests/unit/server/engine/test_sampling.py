"""logit_bias per row in mixed batches, and seeded sampling that does not depend on the batch."""

import asyncio
import uuid

import torch

from lorayard.server.engine.sampler import SequenceState, greedy_tokens, sample_row
from lorayard.server.engine.types import Request, SamplingParams

from ..conftest import peft_greedy
from .test_engine import PROMPTS, _collect, _load


def _run(engine, cases):
    async def run():
        engine.start()
        return await asyncio.gather(*(_collect(engine, Request(uuid.uuid4().hex, *case)) for case in cases))

    return [tokens for tokens, _last in asyncio.run(run())]


def test_logit_bias_per_row_in_a_mixed_adapter_batch(engine, tiny_base_dir, tiny_adapters):
    """Greedy rows with and without a bias, on the base and an adapter, in one batch: each biased row
    equals HF's greedy generate with the same bias (so biased greedy rows left the fast path), the
    unbiased rows are untouched, and +100 on a token makes a sampled row emit only that token."""
    handle = _load(engine, tiny_base_dir, tiny_adapters, "all8")
    n = 10
    plain_base = peft_greedy(tiny_base_dir, None, PROMPTS[0], n)
    plain_adapter = peft_greedy(tiny_base_dir, tiny_adapters / "all8", PROMPTS[1], n)
    ban = tuple((token, -100.0) for token in sorted(set(plain_base[:4])))  # its own favourites, banned
    nudge = ((plain_adapter[3], 6.0), (77, 3.5))
    forced = 4093
    greedy = SamplingParams(max_tokens=n, temperature=0.0)
    cases = [
        (PROMPTS[0], SamplingParams(max_tokens=n, temperature=0.0, logit_bias=ban), None),
        (PROMPTS[0], greedy, None),
        (PROMPTS[1], SamplingParams(max_tokens=n, temperature=0.0, logit_bias=nudge), handle),
        (PROMPTS[1], greedy, handle),
        (
            PROMPTS[2],
            SamplingParams(max_tokens=n, temperature=1.0, seed=3, logit_bias=((forced, 100.0),)),
            handle,
        ),
    ]
    banned, base, nudged, adapter, sampled = _run(engine, cases)
    assert base == plain_base and adapter == plain_adapter
    assert banned == peft_greedy(tiny_base_dir, None, PROMPTS[0], n, ban)
    assert not set(banned) & {token for token, _ in ban}
    assert nudged == peft_greedy(tiny_base_dir, tiny_adapters / "all8", PROMPTS[1], n, nudge)
    assert nudged != plain_adapter
    assert sampled == [forced] * n


def test_seeded_sampling_is_the_same_alone_and_in_any_batch(make_engine):
    """The generator is the request's own: a seeded row draws the same tokens alone and next to other
    sampling rows (which draw from their own generators or the global one)."""
    engine = make_engine(max_batch_size=8, max_model_len=128)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    [alone] = _run(engine, [(PROMPTS[0], seeded)])
    crowd = [
        (PROMPTS[1], SamplingParams(max_tokens=16, temperature=1.0)),
        (PROMPTS[0], seeded),
        (PROMPTS[2], SamplingParams(max_tokens=16, temperature=0.7, seed=99)),
        (PROMPTS[0], SamplingParams(max_tokens=16, temperature=0.0)),
    ]
    _, in_batch, _, _ = _run(engine, crowd)
    assert in_batch == alone
    other_seed = _run(
        engine, [(PROMPTS[0], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=4321))]
    )
    assert other_seed[0] != alone


def test_seeded_generator_lives_on_the_logits_device(test_device):
    """On CUDA a CPU generator cannot sample CUDA probabilities; the generator follows the logits."""
    state = SequenceState.create(SamplingParams(max_tokens=1, seed=7), [1])
    device = torch.zeros(1, device=test_device).device  # as the logits report it: cuda:0, not cuda
    generator = state.generator_on(device)
    assert generator is not None and generator.device.type == device.type
    assert state.generator_on(device) is generator  # one stream of draws per request
    assert SequenceState.create(SamplingParams(max_tokens=1), [1]).generator_on(device) is None


def test_greedy_rows_are_one_argmax_and_the_others_are_left_to_sample_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    states = [
        SequenceState.create(SamplingParams(max_tokens=1, temperature=0.0), [1]),
        SequenceState.create(SamplingParams(max_tokens=1, temperature=0.0, logit_bias=((2, 9.0),)), [1]),
        SequenceState.create(SamplingParams(max_tokens=1, temperature=0.0), [1]),
    ]
    tokens = greedy_tokens(logits, states)
    assert [t.token_id if t else None for t in tokens] == [1, None, 2]
    assert sample_row(logits[1], states[1], frozenset()).token_id == 2  # 1.0 + 9.0 beats 2.0


def test_alternatives_ruled_out_are_not_reported():
    """top_k 1 leaves one finite logprob: -inf alternatives would not even be valid JSON."""
    state = SequenceState.create(SamplingParams(max_tokens=1, temperature=1.0, top_k=1, logprobs=3), [1])
    token = sample_row(torch.tensor([0.5, 2.0, 1.0, -1.0]), state, frozenset())
    assert token.token_id == 1 and token.logprob == 0.0
    assert [t.token_id for t in token.top_logprobs] == [1]
