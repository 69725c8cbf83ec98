"""bench.issue30_ab's stand-ins: the other KV layouts store and gather what ours does, and the sampler's
"before" keeps the same tokens as today's, so its A/B rows compare like with like."""

from __future__ import annotations

import pytest
import torch

from bench.issue30_ab import gather_in, relaid, sorted_top_k_top_p, write_in
from lorayard.server.engine.block_pool import BlockSpec, KVBlockStorage
from lorayard.server.engine.paged_attention import gather_kv, write_kv
from lorayard.server.engine.sampler import top_k_top_p


@pytest.mark.parametrize("layout", ["blocks_first", "token_major"])
def test_other_layouts_write_and_gather_what_ours_does(layout):
    gen = torch.Generator().manual_seed(0)
    storage = KVBlockStorage(
        BlockSpec(layers=2, kv_heads=3, head_dim=8, block_size=16, dtype=torch.float32), 12, "cpu"
    )
    for cache in (*storage.k, *storage.v):
        cache.copy_(torch.randn(cache.shape, generator=gen))
    other = relaid(storage, layout)
    slots = torch.tensor([5, 17, 40, 63])  # offsets 5, 1, 8, 15 of blocks 0, 1, 2, 3 (block size 16)
    k, v = (torch.randn(4, 3, 8, generator=gen) for _ in range(2))
    write_kv(storage.k[0], storage.v[0], slots, k, v)
    write_in(layout, other.k[0], other.v[0], slots, k, v)
    tables = torch.tensor([[3, 0, 7], [1, 2, 11]])
    for ours, theirs in ((storage.k[0], other.k[0]), (storage.v[0], other.v[0])):
        assert torch.equal(gather_in(layout, theirs, tables, 40), gather_kv(ours, tables, 40))


@pytest.mark.parametrize("top_k", [0, 20])
def test_the_sorting_top_p_keeps_what_todays_keeps_away_from_float_ties(top_k):
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 6
    for top_p in (0.3, 0.9):
        before = torch.isfinite(sorted_top_k_top_p(logits, top_k, top_p))
        assert torch.equal(before, torch.isfinite(top_k_top_p(logits, top_k, top_p)))
