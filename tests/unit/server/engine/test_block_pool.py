"""Block pool: allocation, growth, admission, prefix sharing keyed by adapter identity, LRU eviction,
preemption and the leak check; a hypothesis state machine drives random operation sequences against a
shadow KV store to show a reused prefix always holds the K/V its own tokens and weights produced."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lorayard.server.adapters.registry import AdapterLease
from lorayard.server.engine.block_pool import (
    BlockAccountingError,
    BlockPool,
    BlockSpec,
    BlockTable,
    KVBlockStorage,
    adapter_identity,
    blocks_for_budget,
    hash_block,
)
from lorayard.server.engine.scheduler import choose_victim

BS = 4
SYSTEM = list(range(100, 112))  # three full blocks of a shared "system prompt"


def computed(pool: BlockPool, pool_id: str, prompt: list[int], identity: str | None) -> BlockTable:
    """Admit and prefill the whole prompt (as the engine does before its first token)."""
    table = pool.admit(pool_id, prompt, identity)
    assert table is not None
    pool.mark_computed(table, len(prompt))
    return table


# -- sizing ---------------------------------------------------------------------------------------


def test_blocks_for_budget_counts_k_and_v_of_every_layer():
    spec = BlockSpec(layers=30, kv_heads=3, head_dim=64, block_size=16, dtype=torch.float32)
    assert spec.bytes_per_block == 2 * 30 * 16 * 3 * 64 * 4
    assert blocks_for_budget(spec, 0.25, "cpu", min_tokens=2048) == 2**28 // spec.bytes_per_block
    # today's slot cache admits two 2048-token requests in 0.25 GB; the same bytes hold 2048/16 * 2.8 blocks
    assert blocks_for_budget(spec, 0.25, "cpu", 2048) >= 2 * spec.blocks_for_tokens(2048)


def test_budget_too_small_for_one_request_is_refused_naming_the_flags():
    spec = BlockSpec(layers=2, kv_heads=1, head_dim=8, block_size=16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"--kv-cache-memory-gb.*--max-model-len"):
        blocks_for_budget(spec, 1e-6, "cpu", min_tokens=2048)


def test_storage_is_kv_head_outer_per_layer():
    spec = BlockSpec(layers=2, kv_heads=3, head_dim=8, block_size=BS, dtype=torch.float32)
    storage = KVBlockStorage(spec, num_blocks=5, device="cpu")
    assert len(storage.k) == len(storage.v) == 2
    assert storage.k[0].shape == (3, 5, BS, 8)


# -- allocation and growth ------------------------------------------------------------------------


def test_a_request_holds_only_the_blocks_its_tokens_use():
    pool = BlockPool(10, BS)
    table = pool.admit("a", [1, 2, 3, 4, 5], None)
    assert table is not None
    assert len(table.blocks) == 2 and len(set(table.blocks)) == 2
    assert pool.num_free_blocks == 8
    assert table.num_computed == 0 and table.cached_tokens == 0
    pool.check({"a"})


def test_append_takes_a_new_block_exactly_at_a_block_boundary():
    pool = BlockPool(10, BS)
    table = computed(pool, "a", [1, 2, 3], None)
    assert pool.append_token(table, 4)  # position 3: still in block 0
    assert len(table.blocks) == 1
    assert pool.append_token(table, 5)  # position 4: block 1
    assert len(table.blocks) == 2
    for token in (6, 7, 8):
        assert pool.append_token(table, token)
    assert len(table.blocks) == 2
    assert pool.append_token(table, 9)
    assert len(table.blocks) == 3
    assert table.token_ids == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    pool.check({"a"})


def test_slot_mapping_follows_the_block_table():
    pool = BlockPool(10, BS)
    pool.admit("x", [0] * 5, None)  # takes blocks 0, 1 so "a" gets others
    table = pool.admit("a", [1] * 6, None)
    assert table is not None
    b0, b1 = table.blocks
    assert pool.slot_mapping(table, 2, 6) == [b0 * BS + 2, b0 * BS + 3, b1 * BS, b1 * BS + 1]
    with pytest.raises(IndexError):
        pool.slot_mapping(table, 0, 9)


def test_append_refused_when_the_pool_is_dry_leaves_the_table_unchanged():
    pool = BlockPool(2, BS)
    table = computed(pool, "a", [1] * 8, None)
    assert pool.num_free_blocks == 0
    assert not pool.append_token(table, 9)
    assert table.token_ids == [1] * 8 and len(table.blocks) == 2
    pool.check({"a"})


def test_mark_computed_refuses_to_run_past_known_tokens():
    pool = BlockPool(4, BS)
    table = pool.admit("a", [1, 2, 3], None)
    assert table is not None
    with pytest.raises(ValueError, match="cannot mark 4 tokens computed"):
        pool.mark_computed(table, 4)


# -- admission ------------------------------------------------------------------------------------


def test_admission_refused_without_room_for_the_prompt_and_changes_nothing():
    pool = BlockPool(4, BS)
    assert pool.admit("a", [1] * 10, None) is not None  # 3 blocks
    assert not pool.can_admit([2] * 5, None)
    assert pool.admit("b", [2] * 5, None) is None
    assert pool.num_free_blocks == 1
    assert pool.admit("c", [3] * 4, None) is not None
    pool.check({"a", "c"})


def test_admission_keeps_decode_headroom():
    pool = BlockPool(4, BS)
    assert not pool.can_admit([1] * 8, None, headroom_tokens=9)  # 2 + 3 blocks > 4
    assert pool.admit("a", [1] * 8, None, headroom_tokens=9) is None
    table = pool.admit("a", [1] * 8, None, headroom_tokens=8)
    assert table is not None and len(table.blocks) == 2  # headroom is checked, not held
    pool.check({"a"})


def test_admitting_twice_or_an_empty_prompt_is_an_error():
    pool = BlockPool(4, BS)
    pool.admit("a", [1], None)
    with pytest.raises(ValueError, match="already holds"):
        pool.admit("a", [1], None)
    with pytest.raises(ValueError, match="empty"):
        pool.admit("b", [], None)


def test_free_returns_every_block_and_double_free_is_an_error():
    pool = BlockPool(6, BS, prefix_caching=False)
    table = computed(pool, "a", [1] * 9, None)
    pool.append_token(table, 2)
    pool.free(table)
    assert pool.num_free_blocks == 6 and pool.usage() == 0.0
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(table)
    pool.check(set())


def test_usage_counts_referenced_blocks_only():
    pool = BlockPool(8, BS)
    table = computed(pool, "a", [*SYSTEM, 1], None)  # 4 blocks
    assert pool.usage() == 0.5
    pool.free(table)  # 3 full blocks stay cached, reclaimable
    assert pool.usage() == 0.0 and pool.num_cached_blocks == 3


# -- prefix sharing -------------------------------------------------------------------------------


def lease(key: str, slot: int) -> AdapterLease:
    name, _, version = key.partition("@v")
    return AdapterLease(name, int(version) if version else None, key, slot)


def test_same_identity_shares_the_full_prefix_blocks():
    pool = BlockPool(20, BS)
    ident = adapter_identity(lease("support@v2", 3))
    a = computed(pool, "a", [*SYSTEM, 1, 2], ident)
    b = pool.admit("b", [*SYSTEM, 7, 8, 9], ident)
    assert b is not None
    assert b.blocks[:3] == a.blocks[:3] and b.blocks[3] != a.blocks[3]
    assert b.cached_tokens == b.num_computed == 12
    assert b.hashes == a.hashes[:3]
    assert pool.num_free_blocks == 20 - 4 - 1
    stats = pool.prefix_stats[ident]
    assert (stats.hit_tokens, stats.miss_tokens) == (12, 14 + 3)
    pool.check({"a", "b"})


def test_a_reused_prompt_keeps_its_last_token_to_prefill():
    pool = BlockPool(20, BS)
    computed(pool, "a", SYSTEM, None)  # exactly three full blocks
    b = pool.admit("b", SYSTEM, None)
    assert b is not None
    assert b.cached_tokens == 8  # the third block would leave no token for the last logits
    assert pool.slot_mapping(b, 8, 12)  # the engine prefills positions 8..11


def test_blocks_are_shared_only_once_computed():
    pool = BlockPool(20, BS)
    a = pool.admit("a", [*SYSTEM, 1], None)
    assert a is not None
    pool.mark_computed(a, 4)  # first chunk only
    b = pool.admit("b", [*SYSTEM, 2], None)
    assert b is not None and b.cached_tokens == 4


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (None, lease("support@v1", 0)),  # base vs adapter
        (lease("support@v1", 0), lease("legal@v1", 1)),  # two adapters
        (lease("support@v1", 0), lease("support@v2", 1)),  # two versions of one name
        (lease("plain", 0), lease("plain", 5)),  # a plain folder replaced in place: same key, new slot
    ],
    ids=["base-vs-adapter", "across-adapters", "across-versions", "replaced-in-place"],
)
def test_no_sharing_across_weights(first, second):
    pool = BlockPool(20, BS)
    a = computed(pool, "a", [*SYSTEM, 1], adapter_identity(first))
    b = pool.admit("b", [*SYSTEM, 1], adapter_identity(second))
    assert b is not None
    assert b.cached_tokens == 0 and not set(a.blocks) & set(b.blocks)
    assert pool.prefix_stats[adapter_identity(second)].hit_tokens == 0


def test_identity_is_part_of_every_block_key():
    tokens = [1, 2, 3, 4]
    keys = {hash_block(None, ident, tokens) for ident in (None, "a@v1#0", "a@v2#1", "")}
    assert len(keys) == 4  # the empty name is not the base
    parent = hash_block(None, None, tokens)
    assert hash_block(parent, None, tokens) != hash_block(None, None, tokens)


def test_prefix_caching_off_never_shares():
    pool = BlockPool(20, BS, prefix_caching=False)
    computed(pool, "a", [*SYSTEM, 1], None)
    b = pool.admit("b", [*SYSTEM, 1], None)
    assert b is not None and b.cached_tokens == 0
    assert pool.num_cached_blocks == 0 and not pool.prefix_stats


def test_a_request_may_refuse_the_prefix_and_still_feed_the_cache():
    pool = BlockPool(20, BS)
    scoring = pool.admit("logprobs", [*SYSTEM, 2], None, reuse_prefix=False)
    assert scoring is not None
    pool.mark_computed(scoring, 13)
    again = pool.admit("logprobs-again", [*SYSTEM, 2], None, reuse_prefix=False)
    assert again is not None and again.cached_tokens == 0 and len(again.blocks) == 4
    assert not pool.prefix_stats  # neither looked anything up
    later = pool.admit("later", [*SYSTEM, 2, 5], None)
    assert later is not None and later.cached_tokens == 12 and later.blocks[:3] == scoring.blocks[:3]
    pool.check({"logprobs", "logprobs-again", "later"})


def test_twin_prompts_computed_together_keep_one_cached_copy():
    pool = BlockPool(20, BS)
    a = pool.admit("a", [*SYSTEM, 1], None)
    b = pool.admit("b", [*SYSTEM, 1], None)
    assert a is not None and b is not None
    pool.mark_computed(a, 13)
    pool.mark_computed(b, 13)
    assert pool.num_cached_blocks == 3
    first_copy = a.blocks[:3]
    pool.free(a)
    pool.free(b)  # b's twin blocks were never cached: they go back to the free list
    pool.check(set())
    assert pool.num_free_blocks == 20 and pool.num_cached_blocks == 3
    c = pool.admit("c", [*SYSTEM, 1], None)
    assert c is not None and c.cached_tokens == 12 and c.blocks[:3] == first_copy


# -- refcounts, eviction --------------------------------------------------------------------------


def test_refcounts_after_aborts():
    pool = BlockPool(20, BS)
    a = computed(pool, "a", [*SYSTEM, 1], None)
    b = pool.admit("b", [*SYSTEM, 2], None)
    assert b is not None
    shared = a.blocks[:3]
    pool.free(a)  # a aborts: b still holds the shared blocks
    assert pool.num_free_blocks == 20 - 4
    pool.check({"b"})
    c = pool.admit("c", [*SYSTEM, 3], None)
    assert c is not None and c.blocks[:3] == shared
    pool.free(b)
    pool.free(c)
    assert pool.num_free_blocks == 20 and pool.num_cached_blocks == 3
    pool.check(set())


def test_unreferenced_cached_blocks_are_evicted_least_recently_released_first():
    pool = BlockPool(8, BS)
    old = computed(pool, "old", [1] * 8 + [0], None)  # cached blocks: old0, old1 (+ a private tail)
    new = computed(pool, "new", [2] * 8 + [0], None)
    old_blocks = list(old.blocks)
    pool.free(old)
    pool.free(new)
    assert pool.num_cached_blocks == 4
    # 4 free blocks first, then evictions: old's tail block before its head, then new's
    fillers = [pool.admit(f"f{i}", [50 + i], None) for i in range(6)]
    assert all(fillers)
    assert [f.blocks[0] for f in fillers[4:]] == [old_blocks[1], old_blocks[0]]
    assert pool.num_cached_blocks == 2
    pool.free(fillers[0])
    hit = pool.admit("again", [2] * 8 + [0], None)
    assert hit is not None and hit.cached_tokens == 8  # new's chain survived


def test_a_hit_refreshes_a_cached_block_in_the_lru():
    pool = BlockPool(6, BS)
    a = computed(pool, "a", [1] * 4 + [0], None)  # cached: A
    b = computed(pool, "b", [2] * 4 + [0], None)  # cached: B
    pool.free(a)
    pool.free(b)
    pool.free(computed(pool, "a2", [1] * 4 + [9], None))  # hits A: A now released after B
    fillers = [pool.admit(f"f{i}", [7], None) for i in range(5)]  # 4 free blocks, then one eviction
    assert all(fillers)
    assert pool.num_cached_blocks == 1  # B went first
    pool.free(fillers[0])
    again = pool.admit("a3", [1] * 4 + [5], None)
    assert again is not None and again.cached_tokens == 4


# -- preemption -----------------------------------------------------------------------------------


def test_preemption_picks_the_newest_and_its_recompute_hits_its_own_blocks():
    pool = BlockPool(6, BS)
    first = computed(pool, "first", [1] * 6, None)
    second = computed(pool, "second", [2] * 6, None)
    for token in (3, 4, 5):
        assert pool.append_token(second, token)
    pool.mark_computed(second, 8)
    victim = choose_victim(pool.live_tables())
    assert victim is second
    tokens = pool.preempt(victim)
    assert tokens == [2] * 6 + [3, 4, 5]
    pool.check({"first"})
    assert pool.append_token(first, 9) and pool.append_token(first, 9)
    again = pool.admit("second", tokens, None)
    assert again is not None and again.cached_tokens == 8
    assert choose_victim([]) is None


# -- leak check -----------------------------------------------------------------------------------


def test_leak_check_names_finished_requests_still_holding_blocks():
    pool = BlockPool(6, BS)
    computed(pool, "gone", [1] * 5, None)
    with pytest.raises(BlockAccountingError, match=r"finished requests still holding blocks: \['gone'\]"):
        pool.check(set())


def test_leak_check_catches_a_block_in_two_states():
    pool = BlockPool(6, BS)
    table = computed(pool, "a", [1] * 5, None)
    pool._free.append(table.blocks[0])  # a bookkeeping bug: a held block also on the free list
    with pytest.raises(BlockAccountingError, match=f"block {table.blocks[0]} is in 2 states"):
        pool.check()


def test_leak_check_catches_a_refcount_drift():
    pool = BlockPool(6, BS)
    table = computed(pool, "a", [1] * 5, None)
    pool._refs[table.blocks[1]] += 1
    with pytest.raises(BlockAccountingError, match="refcount 2 but 1 tables"):
        pool.check()


# -- random operation sequences -------------------------------------------------------------------

IDENTITIES = [None, "a@v1#0", "a@v2#1", "b@v1#2"]
VOCAB = st.integers(0, 2)
PREFIXES = [[], [0] * BS, [0] * BS + [1] * BS, [1, 2] * BS]
"""Shared "system prompts" of whole blocks, so random prompts hit (and nearly hit) cached prefixes."""
PROMPTS = st.builds(
    lambda prefix, suffix: prefix + suffix,
    st.sampled_from(PREFIXES),
    st.lists(VOCAB, min_size=0, max_size=6),
).filter(bool)


class PoolMachine(RuleBasedStateMachine):
    """Random admit / compute / append / free / preempt. A shadow store records, per slot, the
    (identity, tokens so far) whose K/V the engine would have written there; every computed position
    of every live request must hold its own (identity, prefix): a shared or stale block would not."""

    @initialize(blocks=st.integers(1, 12), caching=st.booleans())
    def setup(self, blocks: int, caching: bool) -> None:
        self.pool = BlockPool(blocks, BS, prefix_caching=caching)
        self.kv: dict[int, tuple[str | None, tuple[int, ...]]] = {}
        self.next_id = 0

    def _write(self, table: BlockTable, start: int, end: int) -> None:
        for position, slot in enumerate(self.pool.slot_mapping(table, start, end), start):
            self.kv[slot] = (table.identity, tuple(table.token_ids[: position + 1]))

    @rule(
        prompt=PROMPTS,
        ident=st.sampled_from(IDENTITIES),
        headroom=st.integers(0, 2 * BS),
        reuse=st.booleans(),
    )
    def admit(self, prompt: list[int], ident: str | None, headroom: int, reuse: bool) -> None:
        free_before = self.pool.num_free_blocks
        could = self.pool.can_admit(prompt, ident, headroom, reuse_prefix=reuse)
        table = self.pool.admit(f"r{self.next_id}", prompt, ident, headroom, reuse_prefix=reuse)
        self.next_id += 1
        assert (table is not None) == could
        if table is None:
            assert self.pool.num_free_blocks == free_before
            return
        assert table.cached_tokens % BS == 0 and table.cached_tokens < len(prompt)
        assert reuse or table.cached_tokens == 0
        assert len(table.blocks) == self.pool.blocks_for_tokens(len(prompt))
        room = self.pool.blocks_for_tokens(len(prompt) + headroom) - len(table.blocks)
        assert self.pool.num_free_blocks >= room  # the decode headroom it was admitted with

    @precondition(lambda self: self.pool.live_tables())
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        """A forward pass writes the next chunk of one request's known tokens."""
        table = data.draw(st.sampled_from(self.pool.live_tables()))
        end = data.draw(st.integers(table.num_computed, len(table.token_ids)))
        self._write(table, table.num_computed, end)
        self.pool.mark_computed(table, end)

    @precondition(lambda self: self.pool.live_tables())
    @rule(data=st.data(), token=VOCAB)
    def append(self, data: st.DataObject, token: int) -> None:
        table = data.draw(st.sampled_from(self.pool.live_tables()))
        if table.num_computed < len(table.token_ids) - 1:
            return  # the engine samples only after the prompt is prefilled
        before = list(table.token_ids)
        if not self.pool.append_token(table, token):
            assert table.token_ids == before and self.pool.num_free_blocks == 0

    @precondition(lambda self: self.pool.live_tables())
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        self.pool.free(data.draw(st.sampled_from(self.pool.live_tables())))

    @precondition(lambda self: self.pool.live_tables())
    @rule()
    def preempt_newest(self) -> None:
        victim = choose_victim(self.pool.live_tables())
        assert victim is not None
        assert victim.admitted == max(t.admitted for t in self.pool.live_tables())
        assert self.pool.preempt(victim) == victim.token_ids

    @invariant()
    def books_balance(self) -> None:
        self.pool.check()
        assert 0.0 <= self.pool.usage() <= 1.0

    @invariant()
    def computed_kv_is_each_requests_own(self) -> None:
        for table in self.pool.live_tables():
            for position, slot in enumerate(self.pool.slot_mapping(table, 0, table.num_computed)):
                assert self.kv.get(slot) == (table.identity, tuple(table.token_ids[: position + 1]))

    @invariant()
    def shared_blocks_share_identity(self) -> None:
        owners: dict[int, set[str | None]] = {}
        for table in self.pool.live_tables():
            for block in table.blocks:
                owners.setdefault(block, set()).add(table.identity)
        assert all(len(idents) == 1 for idents in owners.values())


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_pool_machine = PoolMachine.TestCase
