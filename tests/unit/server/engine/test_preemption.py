"""A KV pool too small for every running request: the newest is preempted and recomputed later, with
outputs unchanged; and no block outlives its request, whatever way the request ends."""

import asyncio
import uuid

import pytest
import torch
from transformers import AutoConfig

from lorayard.server.engine.block_pool import BlockSpec
from lorayard.server.engine.types import Request, SamplingParams

from ..conftest import peft_greedy
from .test_engine import PROMPTS, _collect, _load


def _budget_gb(tiny_base_dir, blocks: int) -> float:
    """--kv-cache-memory-gb that holds exactly ``blocks`` KV blocks of the tiny base."""
    config = AutoConfig.from_pretrained(tiny_base_dir)
    spec = BlockSpec.of_model(config, torch.float32)
    return blocks * spec.bytes_per_block / 2**30


@pytest.mark.parametrize("decode_mode", ["eager", "static"])
def test_preempted_requests_finish_with_peft_equal_outputs(
    make_engine, tiny_base_dir, tiny_adapters, decode_mode
):
    """Four 50-token requests (base and two adapters) in a pool of 6 blocks, where each needs up to 4:
    the pool runs dry mid-decode, the newest requests are preempted and readmitted, and every output
    is PEFT's greedy one, token for token (decode passes packed, or in the static step)."""
    engine = make_engine(
        max_batch_size=4,
        max_model_len=64,
        kv_cache_memory_gb=_budget_gb(tiny_base_dir, 6),
        decode_mode=decode_mode,
    )
    assert engine.pool.num_blocks == 6
    handles = {name: _load(engine, tiny_base_dir, tiny_adapters, name) for name in ("qv4", "all8")}
    cases = [(PROMPTS[0], None), (PROMPTS[1], "qv4"), (PROMPTS[2], "all8"), (PROMPTS[0], "all8")]
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)

    async def run():
        engine.start()
        return await asyncio.gather(
            *(
                _collect(engine, Request(uuid.uuid4().hex, prompt, params, handles.get(name)))
                for prompt, name in cases
            )
        )

    results = asyncio.run(run())
    assert engine.stats().preemptions > 0
    for (prompt, name), (tokens, last) in zip(cases, results, strict=True):
        adapter = None if name is None else tiny_adapters / name
        assert last.error is None and last.finish_reason == "length"
        assert tokens == peft_greedy(tiny_base_dir, adapter, prompt, 50), name
    engine.check_kv()
    assert bool(engine.runner.static_passes) == (decode_mode == "static")


def test_no_block_leaks_after_aborts_in_every_state(make_engine, tiny_base_dir):
    """Aborts while waiting, mid-prefill (a long prompt prefilled 8 tokens a step) and mid-decode,
    beside a request that finishes: afterwards no request holds a block and the pool's books balance
    (the soak checks the same over HTTP, with disconnects, through the kv_cache_blocks gauge)."""
    engine = make_engine(
        max_batch_size=2,
        max_model_len=128,
        prefill_chunk=8,
        idle_prefill_chunk=8,
        kv_cache_memory_gb=_budget_gb(tiny_base_dir, 8),
    )
    long_prompt = [1, *range(500, 560)]
    decode = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)

    async def run():
        engine.start()
        streams = {  # decoding is admitted first: it prefills in one step, then the long prompt
            "decoding": engine.submit(Request("decoding", PROMPTS[0], decode)),
            "prefilling": engine.submit(Request("prefilling", long_prompt, decode)),
            "waiting": engine.submit(Request("waiting", PROMPTS[1], decode)),
            "finishes": engine.submit(Request("finishes", PROMPTS[2], SamplingParams(max_tokens=3))),
        }
        first = await streams["decoding"].__anext__()
        for name in ("prefilling", "waiting", "decoding"):
            engine.abort(name)
        results = {name: [e async for e in stream] for name, stream in streams.items()}
        results["decoding"].insert(0, first)
        while not engine.idle:  # the snapshot the engine thread publishes after its step
            await asyncio.sleep(0.01)
        return results

    results = asyncio.run(run())
    for name in ("prefilling", "waiting", "decoding"):
        assert results[name][-1].finish_reason == "abort", name
    assert results["prefilling"][-1].output_tokens == 0 and results["waiting"][-1].output_tokens == 0
    assert results["finishes"][-1].finish_reason == "length"
    engine.check_kv()
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.kv_cache_usage == 0.0
