"""Paged attention equals dense attention over each request's contiguous K/V: decode rows of different
lengths, one prefill chunk, packed chunks of several requests over cached (and shared) prefixes, a
mixed decode + prefill pass; with GQA. The reference is an independent float64 softmax."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorayard.server.engine.block_pool import BlockPool, BlockSpec, BlockTable, KVBlockStorage
from lorayard.server.engine.paged_attention import (
    CAUSAL,
    LayerAttention,
    PagedBatch,
    causal_prefill_attention,
    fixed_decode_attention,
    fixed_decode_mask,
    gather_kv,
    padded_prefill_attention,
    paged_attention,
    per_request_attention,
    write_kv,
)

KERNELS = {
    "auto": paged_attention,
    "padded": padded_prefill_attention,
    "per_request": per_request_attention,
    "causal": causal_prefill_attention,
}
"""paged_attention picks one of the others; each must be right on its own (causal: fresh prompts only)."""
GENERAL_KERNELS = [name for name in KERNELS if name != "causal"]
"""The kernels for chunks over a cached prefix."""

BS = 4
HD = 8


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[int], layer: LayerAttention = CAUSAL
) -> torch.Tensor:
    """q [n, heads, hd] at ``positions``; k, v [L, kv_heads, hd] of one request -> [n, heads, hd]."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (
        x.double().transpose(0, 1) for x in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
    )
    scale = 1 / math.sqrt(q.shape[-1]) if layer.scale is None else layer.scale
    scores = qd @ kd.transpose(1, 2) * scale  # [heads, n, L]
    if layer.softcap is not None:
        scores = torch.tanh(scores / layer.softcap) * layer.softcap
    key_pos, query_pos = torch.arange(k.shape[0])[None, :], torch.tensor(positions)[:, None]
    causal = key_pos <= query_pos
    if layer.window is not None:
        causal &= key_pos > query_pos - layer.window
    scores = scores.masked_fill(~causal.to(scores.device), float("-inf"))
    return (scores.softmax(-1) @ vd).transpose(0, 1)  # [n, heads, hd]


class Scenario:
    """A pool and its storage, one layer, holding every request's full K/V sequence as ground truth."""

    def __init__(self, num_blocks: int, heads: int, kv_heads: int, dtype: torch.dtype, device: str) -> None:
        self.pool = BlockPool(num_blocks, BS)
        spec = BlockSpec(layers=1, kv_heads=kv_heads, head_dim=HD, block_size=BS, dtype=dtype)
        self.storage = KVBlockStorage(spec, num_blocks, device)
        self.heads, self.kv_heads, self.dtype, self.device = heads, kv_heads, dtype, device
        self.truth: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.gen = torch.Generator().manual_seed(0)

    def _random(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.dtype).to(self.device)

    def kv_for(self, key: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The [length, kv_heads, hd] K and V of a token sequence (shared by equal prefixes: ``key``)."""
        if key not in self.truth or self.truth[key][0].shape[0] < length:
            self.truth[key] = (
                self._random(length, self.kv_heads, HD),
                self._random(length, self.kv_heads, HD),
            )
        k, v = self.truth[key]
        return k[:length], v[:length]

    def admit_computed(self, request_id: str, tokens: list[int], key: str, computed: int) -> BlockTable:
        """Admit ``tokens`` and write the K/V of the first ``computed`` positions (cache hits excluded)."""
        table = self.pool.admit(request_id, tokens, None)
        assert table is not None
        start = table.num_computed
        if computed > start:
            k, v = self.kv_for(key, len(tokens))
            slots = torch.tensor(self.pool.slot_mapping(table, start, computed), device=self.device)
            write_kv(self.storage.k[0], self.storage.v[0], slots, k[start:computed], v[start:computed])
            self.pool.mark_computed(table, computed)
        return table

    def run_pass(
        self, rows: list[tuple[BlockTable, str, int]], kernel: str = "auto", layer: LayerAttention = CAUSAL
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward pass: each (table, key, new) writes its next ``new`` tokens' K/V and attends.
        -> (paged output [T, heads, hd], dense reference per request)."""
        batch = PagedBatch.build(
            [t.blocks for t, _, _ in rows],
            [t.num_computed + new for t, _, new in rows],
            [new for _, _, new in rows],
            BS,
            self.device,
        )
        new_k, new_v, queries, expected = [], [], [], []
        for table, key, new in rows:
            end = table.num_computed + new
            k, v = self.kv_for(key, end)
            q = self._random(new, self.heads, HD)
            new_k.append(k[table.num_computed : end])
            new_v.append(v[table.num_computed : end])
            queries.append(q)
            expected.append(dense_reference(q, k, v, list(range(table.num_computed, end)), layer))
        write_kv(self.storage.k[0], self.storage.v[0], batch.slots, torch.cat(new_k), torch.cat(new_v))
        out = KERNELS[kernel](torch.cat(queries), self.storage.k[0], self.storage.v[0], batch, layer)
        return out, expected

    def scatter_pool(self) -> None:
        """Leave the free list out of order, so block tables are not contiguous ranges."""
        fillers = [self.pool.admit(f"filler{i}", [i], None) for i in range(self.pool.num_blocks)]
        for table in fillers[::2] + fillers[1::2]:
            assert table is not None
            self.pool.free(table)


def assert_close(out: torch.Tensor, expected: list[torch.Tensor], dtype: torch.dtype) -> None:
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), torch.cat(expected).to(out.device), atol=tol, rtol=tol)


DTYPES = [torch.float32, torch.bfloat16]
HEADS = [(6, 2), (4, 4)]  # GQA group 3, and plain multi-head


@pytest.mark.parametrize("kernel", ["auto", "per_request"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "kv_heads"), HEADS, ids=["gqa", "mha"])
def test_decode_rows_of_different_lengths(test_device, dtype, heads, kv_heads, kernel):
    sc = Scenario(64, heads, kv_heads, dtype, test_device)
    sc.scatter_pool()
    rows = []
    for i, length in enumerate([1, 3, 4, 5, 17, 40]):
        table = sc.admit_computed(f"r{i}", [i] * length, f"r{i}", length - 1)  # last token not yet written
        rows.append((table, f"r{i}", 1))
    batch_out, expected = sc.run_pass(rows, kernel)
    assert batch_out.shape == (6, heads, HD)
    assert_close(batch_out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_prefill_chunk_from_scratch(test_device, dtype):
    sc = Scenario(32, 6, 2, dtype, test_device)
    sc.scatter_pool()
    table = sc.admit_computed("a", list(range(23)), "a", 0)
    out, expected = sc.run_pass([(table, "a", 23)])
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "kv_heads"), HEADS, ids=["gqa", "mha"])
def test_fresh_prompts_take_sdpas_own_causal_mask(test_device, dtype, heads, kv_heads):
    """Whole prompts from position 0 (the unique-prompt prefill of issue 30) run SDPA with
    ``is_causal`` and no mask, alone and packed with others, equal to dense attention."""
    sc = Scenario(64, heads, kv_heads, dtype, test_device)
    sc.scatter_pool()
    tables = [sc.admit_computed(f"p{i}", [i] * n, f"p{i}", 0) for i, n in enumerate([23, 1, 9])]
    for rows in (
        [(tables[0], "p0", 23)],
        [(t, f"p{i}", n) for i, (t, n) in enumerate(zip(tables, [23, 1, 9], strict=True))],
    ):
        out, expected = sc.run_pass(rows, "causal")
        assert_close(out, expected, dtype)
    assert PagedBatch.build([[0, 1], [2]], [5, 3], [5, 3], BS, "cpu").fresh
    cached = PagedBatch.build([[0, 1]], [7], [3], BS, "cpu")
    with pytest.raises(ValueError, match="causal prefill needs chunks from position 0"):
        causal_prefill_attention(torch.zeros(3, 6, HD), sc.storage.k[0], sc.storage.v[0], cached)


def test_prefill_chunk_over_a_cached_prefix(test_device):
    sc = Scenario(32, 6, 2, torch.float32, test_device)
    table = sc.admit_computed("a", list(range(30)), "a", 13)  # chunk 1 done (not block-aligned)
    out, expected = sc.run_pass([(table, "a", 10)])  # chunk 2: positions 13..22
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("kernel", GENERAL_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_prefill_of_several_requests_with_shared_cached_prefixes_and_a_decode_row(
    test_device, dtype, kernel
):
    sc = Scenario(64, 6, 2, dtype, test_device)
    sc.scatter_pool()
    system = list(range(100, 112))  # three full blocks
    first = sc.admit_computed("first", [*system, 1, 2, 3], "system+1", 15)
    # "second" and "third" reuse first's three system blocks from the prefix cache: same physical
    # blocks, so the system K/V is the one first wrote (key "system+..." shares its first 12 rows).
    second = sc.admit_computed("second", [*system, 7, 7, 7, 7, 7, 7], "system+1", 0)
    third = sc.admit_computed("third", [*system, 9], "system+1", 0)
    assert second.blocks[:3] == third.blocks[:3] == first.blocks[:3]
    assert second.num_computed == third.num_computed == 12
    k1, v1 = sc.truth["system+1"]
    sc.truth["system+7"] = (torch.cat([k1[:12], k1[:6]]), torch.cat([v1[:12], v1[:6]]))
    sc.truth["system+9"] = sc.truth["system+7"]
    cold = sc.admit_computed("cold", list(range(9)), "cold", 0)
    decoding = sc.admit_computed("decoding", list(range(50, 56)), "decoding", 5)
    out, expected = sc.run_pass(
        [(second, "system+7", 6), (cold, "cold", 9), (decoding, "decoding", 1), (third, "system+9", 1)],
        kernel,
    )
    assert out.shape == (6 + 9 + 1 + 1, 6, HD)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("kernel", GENERAL_KERNELS)
@pytest.mark.parametrize(
    "layer",
    [LayerAttention(window=5), LayerAttention(scale=0.2, softcap=3.0), LayerAttention(0.3, 6, 2.0)],
    ids=["sliding-window", "gemma2-scale-softcap", "all-three"],
)
def test_scale_sliding_window_and_softcap_in_every_kernel(test_device, kernel, layer):
    """Gemma's layers: a sliding window, a query scale and tanh-capped logits, for decode rows and
    packed chunks over cached prefixes longer than the window."""
    sc = Scenario(64, 6, 2, torch.float32, test_device)
    sc.scatter_pool()
    long = sc.admit_computed("long", list(range(30)), "long", 17)
    short = sc.admit_computed("short", list(range(200, 209)), "short", 0)
    decoding = sc.admit_computed("decoding", list(range(50, 62)), "decoding", 11)
    out, expected = sc.run_pass(
        [(long, "long", 13), (short, "short", 9), (decoding, "decoding", 1)], kernel, layer
    )
    assert_close(out, expected, torch.float32)
    rows = [
        (sc.admit_computed(f"d{i}", [i] * n, f"d{i}", n - 1), f"d{i}", 1) for i, n in enumerate([3, 9, 14])
    ]
    out, expected = sc.run_pass(rows, kernel, layer)
    assert_close(out, expected, torch.float32)


def test_write_kv_touches_only_the_given_slots():
    spec = BlockSpec(layers=1, kv_heads=2, head_dim=HD, block_size=BS, dtype=torch.float32)
    storage = KVBlockStorage(spec, 4, "cpu")
    k = torch.randn(3, 2, HD)
    write_kv(storage.k[0], storage.v[0], torch.tensor([5, 6, 13]), k, -k)
    flat = storage.k[0].view(2, -1, HD)  # [kv_heads, slots, hd]
    torch.testing.assert_close(flat[:, [5, 6, 13]], k.transpose(0, 1))
    torch.testing.assert_close(storage.v[0].view(2, -1, HD)[:, [5, 6, 13]], -k.transpose(0, 1))
    untouched = [s for s in range(16) if s not in (5, 6, 13)]
    assert not flat[:, untouched].any()


def test_a_non_finite_kv_in_a_masked_block_reaches_no_row():
    """Issue 23.2: one row's NaN / inf K/V (a hostile adapter's) written into a block that another
    row's table holds masked (a reused block, the static step's scratch block) changes nothing there:
    K/V are stored bounded, so ``score + -inf`` and ``0 * value`` stay 0 for a masked key."""
    spec = BlockSpec(layers=1, kv_heads=2, head_dim=HD, block_size=BS, dtype=torch.float32)
    storage = KVBlockStorage(spec, 4, "cpu")
    k, v = torch.randn(BS, 2, HD), torch.randn(BS, 2, HD)
    write_kv(storage.k[0], storage.v[0], torch.arange(BS), k, v)  # row 0's context: block 0
    tables, lens = torch.tensor([[0, 3]]), torch.tensor([BS])  # block 3 padded in, masked
    mask = fixed_decode_mask(torch.arange(2 * BS), lens, None)
    q = torch.randn(1, 4, HD)
    clean = fixed_decode_attention(q, storage.k[0], storage.v[0], tables, mask)
    hostile = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38])[:, None, None].expand(BS, 2, HD)
    write_kv(storage.k[0], storage.v[0], torch.arange(3 * BS, 4 * BS), hostile, hostile)
    assert torch.isfinite(storage.k[0]).all() and torch.isfinite(storage.v[0]).all()
    torch.testing.assert_close(fixed_decode_attention(q, storage.k[0], storage.v[0], tables, mask), clean)


def test_gather_reads_blocks_in_table_order():
    cache = torch.arange(5 * BS * 1 * 1, dtype=torch.float32).view(1, 5, BS, 1)
    keys = gather_kv(cache, torch.tensor([[3, 1], [0, 0]]), 6)
    assert keys.shape == (2, 1, 6, 1)
    assert keys[0, 0, :, 0].tolist() == [12, 13, 14, 15, 4, 5]


def test_prefill_pads_only_while_padding_costs_little():
    equal = PagedBatch.build([[0, 1], [2, 3]], [8, 8], [4, 4], BS, "cpu")
    assert equal.padded_pairs == equal.pairs == 64
    skewed = PagedBatch.build([[0, 1, 2, 3], [4]], [16, 2], [16, 1], BS, "cpu")
    assert skewed.padded_pairs == 2 * 16 * 16 and skewed.pairs == 16 * 16 + 2


def test_a_mixed_pass_splits_decode_rows_from_prefill_chunks():
    # request 0: chunk of 3, request 1: decode, request 2: chunk of 2, request 3: decode
    batch = PagedBatch.build([[0], [1], [2, 3], [4]], [3, 4, 6, 2], [3, 1, 2, 1], BS, "cpu")
    (decode_rows, decode), (prefill_rows, prefill) = batch.parts
    assert decode.is_decode and decode.query_lens == (1, 1) and decode_rows.tolist() == [3, 6]
    assert prefill.query_lens == (3, 2) and prefill_rows.tolist() == [0, 1, 2, 4, 5]
    assert not decode.parts and not prefill.parts
    assert torch.equal(prefill.positions, batch.positions[prefill_rows])
    assert not PagedBatch.build([[0], [1]], [3, 4], [1, 1], BS, "cpu").parts  # decode only: one part


def test_batch_metadata_refuses_tokens_beyond_the_blocks():
    with pytest.raises(ValueError, match="request 0: 1 new tokens, 9 keys and 2 blocks do not fit"):
        PagedBatch.build([[0, 1]], [9], [1], BS, "cpu")


@settings(max_examples=25, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.integers(1, 30), st.integers(0, 30)),  # (new tokens, cached before), per request
        min_size=1,
        max_size=5,
    ),
    gqa=st.sampled_from([(6, 2), (6, 3), (6, 6), (4, 1)]),
    kernel=st.sampled_from(GENERAL_KERNELS),
)
def test_random_packed_passes_equal_dense(requests, gqa, kernel):
    sc = Scenario(128, gqa[0], gqa[1], torch.float32, "cpu")
    rows = []
    for i, (new, cached) in enumerate(requests):
        table = sc.admit_computed(f"r{i}", [i] * (cached + new), f"r{i}", cached)
        rows.append((table, f"r{i}", new))
    out, expected = sc.run_pass(rows, kernel)
    assert_close(out, expected, torch.float32)
