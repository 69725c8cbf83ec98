"""Prefix caching in the engine: shared prompt prefixes are computed once per set of weights, reused
exactly (PEFT-equal outputs), and never shared across adapters, versions or reloaded weights."""

import asyncio
import uuid

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorayard.server.engine.block_pool import DEFAULT_BLOCK_SIZE
from lorayard.server.engine.types import Request, SamplingParams

from ..conftest import peft_greedy
from .test_engine import _collect, _load

SYSTEM = [1, *range(2000, 2050)]
"""A 51-token shared prefix: three full blocks of 16 and a partial one."""
SHARED_BLOCKS_TOKENS = (len(SYSTEM) // DEFAULT_BLOCK_SIZE) * DEFAULT_BLOCK_SIZE
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def _prompt(i: int) -> list[int]:
    return [*SYSTEM, 3000 + i, 3100 + i, 3200 + i]


async def _wave(engine, cases):
    """Submit every (prompt, adapter) at once; -> [(tokens, last event)] in order."""
    return await asyncio.gather(
        *(_collect(engine, Request(uuid.uuid4().hex, prompt, GREEDY, handle)) for prompt, handle in cases)
    )


@pytest.mark.parametrize("decode_mode", ["eager", "static"])
def test_a_shared_system_prompt_across_the_base_and_two_adapters_matches_peft(
    make_engine, tiny_base_dir, tiny_adapters, decode_mode
):
    """The same system prompt, interleaved over the base and two adapters, in two waves: the second
    wave reuses the blocks its own weights computed in the first (cached_tokens), every output equals
    PEFT's, and a third adapter seeing the same prompt for the first time computes it all."""
    engine = make_engine(max_batch_size=8, max_model_len=128, decode_mode=decode_mode)
    names = [None, "qv4", "all8"]
    handles = {name: name and _load(engine, tiny_base_dir, tiny_adapters, name) for name in names}
    roles = [names[i % 3] for i in range(6)]

    async def run():
        engine.start()
        first = await _wave(engine, [(_prompt(i), handles[r]) for i, r in enumerate(roles)])
        second = await _wave(engine, [(_prompt(10 + i), handles[r]) for i, r in enumerate(roles)])
        newcomer = _load(engine, tiny_base_dir, tiny_adapters, "mlp16")
        third = await _collect(engine, Request("n", _prompt(20), GREEDY, newcomer))
        return first, second, third

    first, second, (third_tokens, third_last) = asyncio.run(run())
    for offset, wave in ((0, first), (10, second)):
        for i, (role, (tokens, last)) in enumerate(zip(roles, wave, strict=True)):
            adapter = None if role is None else tiny_adapters / role
            assert tokens == peft_greedy(tiny_base_dir, adapter, _prompt(offset + i), 8), (role, offset + i)
            assert last.error is None
    assert [last.cached_tokens for _, last in second] == [SHARED_BLOCKS_TOKENS] * 6
    assert third_last.cached_tokens == 0  # the base's and the other adapters' blocks are not its own
    assert third_tokens == peft_greedy(tiny_base_dir, tiny_adapters / "mlp16", _prompt(20), 8)
    assert bool(engine.runner.static_passes) == (decode_mode == "static")
    engine.check_kv()


def test_reloaded_weights_under_the_same_key_never_reuse_the_old_prefix(
    make_engine, tiny_base_dir, tiny_adapters
):
    """A plain folder rewritten in place comes back under the same key with other weights: the
    registry loads them into a new engine slot, and the prefix the old weights computed is not hit."""
    engine = make_engine(max_batch_size=4, max_model_len=128)
    old = _load(engine, tiny_base_dir, tiny_adapters, "qv4")

    async def run():
        engine.start()
        await _collect(engine, Request("a", _prompt(0), GREEDY, old))
        again = await _collect(engine, Request("b", _prompt(1), GREEDY, old))
        engine.free_adapter_weights(old.slot)
        new = _load(engine, tiny_base_dir, tiny_adapters, "all8")
        new.key = old.key  # same name, same key: only the slot tells the weights apart
        swapped = await _collect(engine, Request("c", _prompt(1), GREEDY, new))
        return again, swapped

    (_, again_last), (swapped_tokens, swapped_last) = asyncio.run(run())
    assert again_last.cached_tokens == SHARED_BLOCKS_TOKENS  # the cache was live for the old weights
    assert swapped_last.cached_tokens == 0
    assert swapped_tokens == peft_greedy(tiny_base_dir, tiny_adapters / "all8", _prompt(1), 8)


def test_no_prefix_caching_computes_every_prompt(make_engine, tiny_base_dir):
    engine = make_engine(max_batch_size=2, max_model_len=128, prefix_caching=False)

    async def run():
        engine.start()
        return [await _collect(engine, Request(str(i), _prompt(i), GREEDY)) for i in range(2)]

    results = asyncio.run(run())
    assert [last.cached_tokens for _, last in results] == [0, 0]
    assert engine.stats().kv_blocks_cached == 0
    for i, (tokens, _) in enumerate(results):
        assert tokens == peft_greedy(tiny_base_dir, None, _prompt(i), 8)


def test_prompt_logprobs_are_computed_even_when_the_prefix_is_cached(make_engine, tiny_base_dir):
    """A scoring request needs every prompt position's logits, so it never takes cached blocks: its
    logprobs equal the model's own log-softmax although the prompt's prefix is in the cache."""
    engine = make_engine(max_batch_size=2, max_model_len=128)
    prompt = _prompt(0)
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=0)

    async def run():
        engine.start()
        await _collect(engine, Request("warm", prompt, GREEDY))
        return await _collect(engine, Request("score", prompt, scoring))

    _, last = asyncio.run(run())
    assert last.cached_tokens == 0 and last.finish_reason == "length"
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    expected = [float(logprobs[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert last.prompt_logprobs is not None and last.prompt_logprobs[0] is None
    got = [entry.logprob for entry in last.prompt_logprobs[1:]]
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-4)
