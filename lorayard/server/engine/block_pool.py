"""Paged KV cache: a pool of fixed-size KV blocks, per-request block tables, and a prefix cache.

Every request holds a :class:`BlockTable`: the ids of the blocks its tokens' K/V live in, in order
(token ``p`` lives in block ``blocks[p // block_size]`` at offset ``p % block_size``). A request holds
only the blocks its tokens use, so short requests no longer reserve a ``max_model_len`` slot.

Prefix caching shares FULL blocks between requests. A full block is keyed by the sha256 of
(its parent block's key, the adapter identity, its token ids): equal keys mean equal token chains
from position 0 under the same weights, hence equal K/V. Only full, already computed blocks are
shared and they are never written again, so no copy-on-write is needed. The adapter identity must
change whenever the weights do (see :func:`adapter_identity`): that is what keeps a reloaded adapter
from reading K/V computed with its old weights (vLLM keys on the adapter's name and does, #30931).

Every block is in exactly one state, checked by :meth:`BlockPool.check`:

* free: never cached, or evicted; holds nothing of value;
* cached and unreferenced ("evictable"): a registered full block no live table uses, kept for
  future prefix hits and reclaimed least recently released first when the pool needs space;
* referenced: in one or more live tables (more than one only for shared cached blocks).

The pool is host-side bookkeeping only (plain ints, no device reads); :class:`KVBlockStorage` holds
the tensors and :mod:`lorayard.server.engine.paged_attention` reads and writes them through the tables.
Full design: docs/paged_kv.md.
"""

from __future__ import annotations

import array
import collections
import hashlib
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lorayard.architectures import head_dim, kv_heads, language_config
from lorayard.server.engine.types import BlockAccountingError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from lorayard.server.engine.types import AdapterHandle

DEFAULT_BLOCK_SIZE = 16
"""Tokens per block (vLLM's default): small enough that a request wastes under one block on average,
large enough that block tables stay short and a gather moves contiguous runs of K/V."""

GPU_FREE_SHARE = 0.8
"""Share of free GPU memory the KV pool takes when no budget is given."""

DEFAULT_CPU_BUDGET_GB = 4.0
"""KV budget when none is given on the CPU (the pool is also capped at what ``max_batch_size``
requests of ``max_model_len`` tokens can use, so small models never allocate it all)."""

BlockHash = bytes
"""sha256 digest (32 bytes) of a full block's key; see :func:`hash_block`."""

AdapterIdentity = str | None
"""What prefix-cache keys name the weights by: None for the plain base, else a string that is
unique per loaded set of adapter weights (:func:`adapter_identity`)."""

_ROOT = bytes(32)
"""Parent key of a prompt's first block."""


@dataclass(frozen=True)
class BlockSpec:
    """Shape of one KV block across the model: K and V for every layer."""

    layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.layers * self.block_size * self.kv_heads * self.head_dim * element

    def blocks_for_tokens(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    @classmethod
    def of_model(
        cls, config: PretrainedConfig, dtype: torch.dtype, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> BlockSpec:
        """The block shape of a model's KV: its layers, KV heads and head dim (:func:`head_dim`)."""
        return cls(
            language_config(config).num_hidden_layers, kv_heads(config), head_dim(config), block_size, dtype
        )


def kv_budget_bytes(budget_gb: float | None, device: str) -> int:
    """``--kv-cache-memory-gb`` in bytes; unset: a share of free GPU memory, or the CPU default."""
    if budget_gb is None:
        if device.startswith("cuda") and torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            return int(GPU_FREE_SHARE * free)
        budget_gb = DEFAULT_CPU_BUDGET_GB
    return int(budget_gb * 2**30)


def blocks_for_budget(spec: BlockSpec, budget_gb: float | None, device: str, min_tokens: int) -> int:
    """How many blocks the budget holds; refused (ValueError naming the flag) if that is fewer than
    one request of ``min_tokens`` tokens (``--max-model-len``) needs."""
    blocks = kv_budget_bytes(budget_gb, device) // spec.bytes_per_block
    needed = spec.blocks_for_tokens(min_tokens)
    if blocks < needed:
        raise ValueError(
            f"--kv-cache-memory-gb holds {blocks} KV blocks of {spec.block_size} tokens "
            f"({spec.bytes_per_block} bytes each) but one request of --max-model-len {min_tokens} "
            f"tokens needs {needed}: raise the budget or lower --max-model-len"
        )
    return blocks


class KVBlockStorage:
    """k[layer], v[layer]: [kv_heads, num_blocks, block_size, head_dim].

    KV head outermost, so one gather of a request's blocks along dim 1 gives [kv_heads, R, M,
    block_size, hd], a free view as [kv_heads, R, L, hd] whose last two dims (L, hd) are contiguous:
    the layout attention kernels read fast, reached with ONE copy. Token-major blocks
    ([num_blocks, block_size, kv_heads, hd], vLLM's) leave a stride of kv_heads * hd between tokens
    after the gather, and per-block head-major ([num_blocks, kv_heads, block_size, hd]) needs a second
    copy to merge the block axes; both measured slower in bench/paged_attention.py, and as whole
    decode steps in bench/issue30_ab.py (blocks-first 0.87-0.93x at 16 and 64 rows, token-major a tie).
    """

    def __init__(self, spec: BlockSpec, num_blocks: int, device: str | torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (spec.kv_heads, num_blocks, spec.block_size, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.layers)]
        self.v = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.layers)]


def adapter_identity(adapter: AdapterHandle | None) -> AdapterIdentity:
    """The prefix-cache identity of a request's weights: None for the base, else ``key#slot``.

    ``key`` (``name@vN``) names an immutable published version, but the same key can come back with
    other weights: a plain PEFT folder (key ``name``) rewritten in place, or a version deleted and
    republished. The registry then loads the new files into a new engine slot, and the engine never
    reuses a slot number (``itertools.count``), so ``key#slot`` differs whenever the weights may
    differ. The cost: an unchanged version evicted from residency and loaded again gets a new slot and
    misses its old prefixes (they age out of the LRU); never a stale hit.
    """
    return None if adapter is None else f"{adapter.key}#{adapter.slot}"


def hash_block(parent: BlockHash | None, identity: AdapterIdentity, tokens: Sequence[int]) -> BlockHash:
    """sha256 of (parent key, adapter identity, token ids), each framed so no two inputs share bytes.

    A cryptographic hash rather than Python's ``hash``: a 64-bit collision would serve another
    prompt's K/V silently, and prompts are attacker-chosen.
    """
    h = hashlib.sha256(parent if parent is not None else _ROOT)
    if identity is None:
        h.update(b"\x00")
    else:
        name = identity.encode()
        h.update(b"\x01" + len(name).to_bytes(4, "little") + name)
    h.update(array.array("q", tokens).tobytes())
    return h.digest()


@dataclass
class PrefixStats:
    """Prompt tokens found in (hit) or missing from (miss) the prefix cache at admission."""

    hit_tokens: int = 0
    miss_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0


@dataclass(eq=False)
class BlockTable:
    """One live request's blocks. Token ``p`` lives at ``blocks[p // bs]``, offset ``p % bs``."""

    pool_id: str
    """The request's name in this pool (the engine's, unique even where two requests share an id)."""
    identity: AdapterIdentity
    token_ids: list[int]
    """Prompt and generated tokens known so far (the last one's K/V is written by the next step)."""
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose K/V is written: prefill and decode start from here."""
    cached_tokens: int = 0
    """Tokens reused from the prefix cache at admission (a multiple of the block size)."""
    hashes: list[BlockHash] = field(default_factory=list)
    """Keys of the first ``len(hashes)`` full, computed blocks (registered in the cache or not)."""
    admitted: int = 0
    """Admission order (larger: later); the preemption policy picks the largest."""


class BlockPool:
    """Fixed-size KV blocks: allocation, per-request tables, prefix cache, LRU eviction, preemption."""

    def __init__(
        self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, *, prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"a block pool needs blocks and tokens per block (got {num_blocks}, {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # Used as a stack: the most recently freed block is reused first, still warm in the CPU's
        # caches; block 0 is handed out first.
        self._free: collections.deque[int] = collections.deque(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        """The key a block is registered under in ``_cached``; None: not in the prefix cache."""
        self._cached: dict[BlockHash, int] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        """Cached blocks no table references, least recently released first."""
        self._tables: dict[str, BlockTable] = {}
        self._admissions = 0
        self.prefix_stats: dict[AdapterIdentity, PrefixStats] = collections.defaultdict(PrefixStats)
        """Per adapter identity: prompt tokens hit / missed at admission (the prefix-hit metric)."""

    # -- figures ----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks live requests hold."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, referenced or not."""
        return len(self._cached)

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks no live request uses: kept for prefix hits, reclaimed when space is needed."""
        return len(self._evictable)

    def usage(self) -> float:
        """Share of blocks referenced by live requests, 0..1 (cached-unreferenced blocks count as free:
        they are reclaimed on demand). The KV-usage gauge."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for_tokens(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def live_tables(self) -> list[BlockTable]:
        return list(self._tables.values())

    # -- admission --------------------------------------------------------------------------------
    def _lookup(
        self, prompt_ids: Sequence[int], identity: AdapterIdentity, reuse_prefix: bool
    ) -> tuple[list[int], list[BlockHash]]:
        """The longest chain of cached full blocks that starts the prompt, leaving at least one prompt
        token uncached (the engine needs the last prompt token's logits). -> (block ids, their keys)."""
        if not (self.prefix_caching and reuse_prefix):
            return [], []
        blocks: list[int] = []
        hashes: list[BlockHash] = []
        parent: BlockHash | None = None
        bs = self.block_size
        for i in range((len(prompt_ids) - 1) // bs):
            parent = hash_block(parent, identity, prompt_ids[i * bs : (i + 1) * bs])
            block = self._cached.get(parent)
            if block is None:
                break
            blocks.append(block)
            hashes.append(parent)
        return blocks, hashes

    def _new_blocks_available(self, hits: Sequence[int]) -> int:
        """Blocks allocatable after the hit blocks are taken (an evictable hit stops being evictable)."""
        return self.num_free_blocks - sum(1 for b in hits if self._refs[b] == 0)

    def can_admit(
        self,
        prompt_ids: Sequence[int],
        identity: AdapterIdentity,
        headroom_tokens: int = 0,
        *,
        reuse_prefix: bool = True,
    ) -> bool:
        """Would :meth:`admit` succeed now? Pure: changes nothing, counts no prefix statistics."""
        hits, _ = self._lookup(prompt_ids, identity, reuse_prefix)
        needed = self.blocks_for_tokens(len(prompt_ids) + headroom_tokens) - len(hits)
        return needed <= self._new_blocks_available(hits)

    def admit(
        self,
        pool_id: str,
        prompt_ids: Sequence[int],
        identity: AdapterIdentity,
        headroom_tokens: int = 0,
        *,
        reuse_prefix: bool = True,
    ) -> BlockTable | None:
        """Give a request blocks for its whole prompt, reusing the longest cached prefix; None (and
        nothing changed) unless the pool also keeps ``headroom_tokens`` more tokens' worth of blocks
        free for it (decode room, so a newcomer does not force a preemption at once).

        ``reuse_prefix=False``: compute the whole prompt even if cached (a request that asks for prompt
        logprobs needs every prompt position's logits); its blocks are still cached for others."""
        if not prompt_ids:
            raise ValueError("cannot admit an empty prompt")
        if pool_id in self._tables:
            raise ValueError(f"request {pool_id!r} already holds blocks")
        hits, hashes = self._lookup(prompt_ids, identity, reuse_prefix)
        needed = self.blocks_for_tokens(len(prompt_ids) + headroom_tokens) - len(hits)
        if needed > self._new_blocks_available(hits):
            return None
        for block in hits:
            self._ref(block)
        fresh = [self._take_block() for _ in range(self.blocks_for_tokens(len(prompt_ids)) - len(hits))]
        cached = len(hits) * self.block_size
        self._admissions += 1
        table = BlockTable(
            pool_id,
            identity,
            list(prompt_ids),
            blocks=hits + fresh,
            num_computed=cached,
            cached_tokens=cached,
            hashes=hashes,
            admitted=self._admissions,
        )
        self._tables[pool_id] = table
        if self.prefix_caching and reuse_prefix:
            stats = self.prefix_stats[identity]
            stats.hit_tokens += cached
            stats.miss_tokens += len(prompt_ids) - cached
        return table

    # -- growth -----------------------------------------------------------------------------------
    def append_token(self, table: BlockTable, token_id: int) -> bool:
        """Record a generated token and make room for its K/V (maybe a new block). False, with the
        table unchanged, when the pool has no block left: the scheduler preempts and retries."""
        if len(table.token_ids) + 1 > len(table.blocks) * self.block_size:
            if self.num_free_blocks == 0:
                return False
            table.blocks.append(self._take_block())
        table.token_ids.append(token_id)
        return True

    def slot_mapping(self, table: BlockTable, start: int, end: int) -> list[int]:
        """Flat slots (``block * block_size + offset``) of positions start .. end - 1, for writing K/V."""
        if not 0 <= start <= end <= len(table.blocks) * self.block_size:
            raise IndexError(f"positions {start}..{end} outside the {len(table.blocks)} blocks held")
        bs = self.block_size
        return [table.blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def mark_computed(self, table: BlockTable, num_computed: int) -> None:
        """After a forward pass wrote K/V up to ``num_computed`` tokens: record it and register every
        block that is now full in the prefix cache (only then: a block is shared once it is final)."""
        if (
            not table.num_computed
            <= num_computed
            <= min(len(table.token_ids), len(table.blocks) * self.block_size)
        ):
            raise ValueError(
                f"request {table.pool_id!r}: cannot mark {num_computed} tokens computed "
                f"({table.num_computed} computed, {len(table.token_ids)} known, {len(table.blocks)} blocks)"
            )
        table.num_computed = num_computed
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(table.hashes), num_computed // bs):
            parent = table.hashes[-1] if table.hashes else None
            key = hash_block(parent, table.identity, table.token_ids[i * bs : (i + 1) * bs])
            table.hashes.append(key)
            block = table.blocks[i]
            # A twin computed at the same time (same prompt admitted twice before either finished)
            # stays private to its table; the first registered copy serves later hits.
            if key not in self._cached:
                self._cached[key] = block
                self._hash_of[block] = key

    # -- release ----------------------------------------------------------------------------------
    def free(self, table: BlockTable) -> None:
        """Release a finished or aborted request's blocks. Full computed blocks stay cached.

        Released tail first, so within one chain the LRU evicts the last block before the first: a
        chain's head is useful without its tail, never the other way round."""
        if self._tables.get(table.pool_id) is not table:
            raise ValueError(f"request {table.pool_id!r} holds no blocks (freed twice?)")
        del self._tables[table.pool_id]
        for block in reversed(table.blocks):
            self._unref(block)
        table.blocks = []

    def preempt(self, table: BlockTable) -> list[int]:
        """Free a running request's blocks to make room; returns the tokens to prefill when it is
        admitted again (prompt and generated so far: recomputation). Its full blocks stay cached, so
        the readmission's prefill is mostly prefix hits unless the space was taken meanwhile."""
        tokens = list(table.token_ids)
        self.free(table)
        return tokens

    # -- blocks -----------------------------------------------------------------------------------
    def _take_block(self) -> int:
        """A block for new K/V: a free one, else the least recently released cached one."""
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            key = self._hash_of[block]
            assert key is not None
            del self._cached[key]
            self._hash_of[block] = None
        self._refs[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def _unref(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if self._hash_of[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    # -- invariants -------------------------------------------------------------------------------
    def check(self, live_pool_ids: Collection[str] | None = None) -> None:
        """Raise :class:`BlockAccountingError` listing every broken invariant: each block is exactly one
        of free, cached-unreferenced, or referenced by live tables (refcount = tables holding it); the
        cache map and block keys agree; if given, the live tables are exactly ``live_pool_ids``."""
        problems = list(self._problems(live_pool_ids))
        if problems:
            raise BlockAccountingError("; ".join(problems))

    def _problems(self, live_pool_ids: Collection[str] | None) -> Iterable[str]:
        held = collections.Counter(b for t in self._tables.values() for b in t.blocks)
        free = collections.Counter(self._free)
        for block in range(self.num_blocks):
            states = [free[block] > 0, block in self._evictable, held[block] > 0]
            if sum(states) != 1 or free[block] > 1:
                yield (
                    f"block {block} is in {sum(states)} states "
                    f"(free x{free[block]}, evictable {states[1]}, held x{held[block]})"
                )
            if self._refs[block] != held[block]:
                yield f"block {block} has refcount {self._refs[block]} but {held[block]} tables hold it"
            if block in self._evictable and self._hash_of[block] is None:
                yield f"block {block} is evictable but not cached"
            key = self._hash_of[block]
            if key is not None and self._cached.get(key) != block:
                yield f"block {block} claims a cache key that maps elsewhere"
        for key, block in self._cached.items():
            if self._hash_of[block] != key:
                yield f"cache key maps to block {block}, which does not claim it"
        for table in self._tables.values():
            if len(set(table.blocks)) != len(table.blocks):
                yield f"request {table.pool_id!r} holds a block twice"
            if len(table.token_ids) > len(table.blocks) * self.block_size:
                yield f"request {table.pool_id!r} has more tokens than its blocks hold"
        if live_pool_ids is not None and set(live_pool_ids) != set(self._tables):
            leaked = sorted(set(self._tables) - set(live_pool_ids))
            missing = sorted(set(live_pool_ids) - set(self._tables))
            yield f"finished requests still holding blocks: {leaked}; live requests without blocks: {missing}"
