"""The scheduler: which requests run, which rows the next forward pass computes, who is preempted.

Torch-free (vLLM v1's split): the engine thread calls it and acts on what it returns; it never emits
an event, never touches a tensor or a queue.

* :meth:`Scheduler.add` queues a request; :meth:`Scheduler.abort` retires the named ones and returns
  them, so the engine emits their final events after their blocks are back in the pool.
* :meth:`Scheduler.schedule` admits waiting requests FIFO while ``max_batch_size`` and the pool allow
  (a preempted request waits at the front) and returns the pass plan: one token for each decoding
  row, prompt chunks of the newcomers (oldest first) within ``prefill_chunk`` tokens while any row
  decodes, within ``idle_prefill_chunk`` while none does (nobody's next token waits on that pass).
* After the pass the engine reports each row computed (:meth:`Scheduler.computed`), retires finished
  requests (:meth:`Scheduler.retire`) and gives each sampled row room for its next token
  (:meth:`Scheduler.make_room`), which preempts the most recently admitted requests while the pool is
  dry and returns them.
* :meth:`Scheduler.stats` is the per-step snapshot of counts the engine publishes to other threads.

The pool comes in through :class:`KVPool` (``block_pool.BlockPool`` implements it), because the block
module also holds the KV tensors and importing it would import torch.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

from lorayard.server.engine.types import BlockAccountingError, EngineStats, PromptLogprob, Request

if TYPE_CHECKING:
    from collections.abc import Sequence as Tokens

    from lorayard.server.engine.block_pool import BlockTable

LogitsWanted = Literal["last", "all", "none"]


class KVPool(Protocol):
    """What the scheduler needs of the paged KV pool (:class:`~.block_pool.BlockPool`)."""

    num_blocks: int
    block_size: int

    @property
    def num_used_blocks(self) -> int: ...

    @property
    def num_evictable_blocks(self) -> int: ...

    def usage(self) -> float: ...

    def admit(
        self,
        pool_id: str,
        prompt_ids: Tokens[int],
        identity: str | None,
        headroom_tokens: int = 0,
        *,
        reuse_prefix: bool = True,
    ) -> BlockTable | None: ...

    def append_token(self, table: BlockTable, token_id: int) -> bool: ...

    def mark_computed(self, table: BlockTable, num_computed: int) -> None: ...

    def free(self, table: BlockTable) -> None: ...

    def preempt(self, table: BlockTable) -> list[int]: ...

    def check(self, live_pool_ids: Collection[str] | None = None) -> None: ...


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler tracks it (the engine's subclass adds its sampler state and queue)."""

    request: Request
    pool_id: str
    """The request's name in the block pool: unique even if two requests share a request id."""
    identity: str | None
    """Whose weights its K/V is computed under (``block_pool.adapter_identity``): the prefix-cache key."""
    output_ids: list[int]
    """Tokens generated so far (the sampler's list: the engine appends, the scheduler reads)."""
    table: BlockTable | None = None
    """Its KV blocks while running; None while waiting (never admitted, or preempted)."""
    cached_tokens: int | None = None
    """Prompt tokens its first admission found in the prefix cache (None until admitted)."""
    finished: bool = False
    prompt_logprobs: list[PromptLogprob | None] | None = None
    """With ``prompt_logprobs`` asked: filled chunk by chunk during prefill (the first token has none)."""

    def __post_init__(self) -> None:
        if self.request.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def scoring(self) -> bool:
        """Prompt logprobs asked and not complete yet: every prompt position must be computed."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.request.prompt_ids)

    @property
    def tokens(self) -> list[int]:
        """What its KV must hold: the prompt and every token generated so far."""
        return self.request.prompt_ids + self.output_ids


S = TypeVar("S", bound=Sequence)
"""The caller's sequence type: the scheduler hands back the very objects it was given."""


@dataclass(frozen=True, slots=True)
class PlannedRow(Generic[S]):
    """One row of the next forward pass: ``ids`` at positions ``start ..`` of ``seq``'s table."""

    seq: S
    ids: list[int]
    start: int
    logits: LogitsWanted
    samples: bool
    """The row computes every pending token, so its last logits pick the next token."""

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


def choose_victim(tables: Iterable[BlockTable]) -> BlockTable | None:
    """The request to preempt when the pool runs dry: the most recently admitted (vLLM's policy under
    first-come-first-served). It has done the least work, so recomputing it costs least, and the
    oldest requests, which users have waited on longest, keep running to completion."""
    return max(tables, key=lambda t: t.admitted, default=None)


class Scheduler(Generic[S]):
    """Waiting and running requests over one KV pool; see the module docstring."""

    def __init__(
        self, pool: KVPool, *, max_batch_size: int, prefill_chunk: int, idle_prefill_chunk: int | None = None
    ) -> None:
        """``idle_prefill_chunk``: the prompt-token budget of a pass with no decoding row (at least
        ``prefill_chunk``; None: ``prefill_chunk``)."""
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.idle_prefill_chunk = max(prefill_chunk, idle_prefill_chunk or prefill_chunk)
        self.waiting: collections.deque[S] = collections.deque()
        self.running: list[S] = []
        self.preemptions = 0
        self.step_admissions = 0
        """Requests admitted by the last :meth:`schedule` (the engine republishes its figures then)."""
        self._step_preemptions = 0
        self._last_batch = 0

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, seq: S) -> None:
        self.waiting.append(seq)

    def abort(self, request_ids: Collection[str]) -> list[S]:
        """Retire every waiting or running request with one of these ids; returns them."""
        aborted = [s for s in (*self.waiting, *self.running) if s.request.request_id in request_ids]
        for seq in aborted:
            self.retire(seq)
        return aborted

    # -- the plan -----------------------------------------------------------------------------------
    def schedule(self) -> list[PlannedRow[S]]:
        """Start a step: admit what fits, then plan the pass over every running request's pending tokens."""
        self._step_preemptions = 0
        self.step_admissions = 0
        self._admit()
        planned = self._plan()
        self._last_batch = len(planned)
        return planned

    def _admit(self) -> None:
        """FIFO while the batch limit and the pool allow; a preempted request waits at the front."""
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            # Decode room for the first new tokens, so a newcomer does not force a preemption at once.
            headroom = min(self.pool.block_size, seq.request.params.max_tokens - len(seq.output_ids))
            table = self.pool.admit(
                seq.pool_id,
                seq.tokens,
                seq.identity,
                headroom,
                reuse_prefix=not seq.scoring,  # prompt logprobs need every position's logits
            )
            if table is None:
                break
            self.waiting.popleft()
            if seq.cached_tokens is None:
                seq.cached_tokens = table.cached_tokens
            seq.table = table
            self.running.append(seq)
            self.step_admissions += 1

    def _plan(self) -> list[PlannedRow[S]]:
        """Prompt chunks within the budget (oldest first), one token per decoding row. The budget bounds
        how long decoding rows wait for their next token; with none decoding it is the larger idle one,
        so a lone prompt is prefilled in one pass (whole-prompt causal attention, no re-read of its
        earlier chunks' K/V) instead of several."""
        planned: list[PlannedRow[S]] = []
        decoding = any(
            s.table is not None and len(s.table.token_ids) - s.table.num_computed == 1 for s in self.running
        )
        budget = self.prefill_chunk if decoding else self.idle_prefill_chunk
        for seq in self.running:
            table = seq.table
            assert table is not None
            start = table.num_computed
            pending = len(table.token_ids) - start
            count = pending if pending == 1 else min(pending, budget)
            if count <= 0:
                continue
            if pending > 1:
                budget -= count
            samples = count == pending
            logits: LogitsWanted = "all" if seq.scoring else "last" if samples else "none"
            planned.append(PlannedRow(seq, table.token_ids[start : start + count], start, logits, samples))
        return planned

    # -- after the pass -----------------------------------------------------------------------------
    def computed(self, row: PlannedRow[S]) -> None:
        """The pass wrote the row's K/V: its full blocks may enter the prefix cache."""
        assert row.seq.table is not None
        self.pool.mark_computed(row.seq.table, row.end)

    def make_room(self, seq: S) -> list[S]:
        """Record the row's newest token in its block table, preempting the most recently admitted
        requests while the pool has no block for it (possibly this very row); returns the preempted."""
        assert seq.table is not None
        token = seq.output_ids[-1]
        preempted: list[S] = []
        while not self.pool.append_token(seq.table, token):
            # Tables hash by identity (eq=False): the map leads from the policy's choice to its request.
            holders = {s.table: s for s in self.running if s.table is not None}
            victim_table = choose_victim(holders)
            assert victim_table is not None  # seq itself holds blocks
            victim = holders[victim_table]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                break
        return preempted

    def _preempt(self, seq: S) -> None:
        """Free a running request's blocks and queue it first: readmitted, it recomputes its prompt and
        output so far (mostly prefix hits when its blocks are still cached), then samples on."""
        assert seq.table is not None
        self.pool.preempt(seq.table)
        seq.table = None
        self.running.remove(seq)
        if seq.scoring:  # its prompt logprobs are recomputed from the first position
            seq.prompt_logprobs = [None]
        self.waiting.appendleft(seq)
        self.preemptions += 1
        self._step_preemptions += 1

    def retire(self, seq: S) -> None:
        """A finished, aborted or failed request leaves: its blocks go back before anyone hears of it."""
        if seq.finished:
            return
        seq.finished = True
        if seq.table is not None:
            self.running.remove(seq)
            self.pool.free(seq.table)
            seq.table = None
        else:  # waiting: never admitted, or preempted
            self.waiting.remove(seq)

    def retire_all(self) -> list[S]:
        """Retire every running request (the engine's last resort after a bug in a step); returns them."""
        retired = list(self.running)
        for seq in retired:
            self.retire(seq)
        return retired

    # -- figures ------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """This step's snapshot: counts only (other threads read it; nothing in it is shared state)."""
        pool = self.pool
        used, cached = pool.num_used_blocks, pool.num_evictable_blocks
        stats = EngineStats(
            running=len(self.running),
            waiting=len(self.waiting),
            batch_size=self._last_batch,
            kv_cache_usage=used / pool.num_blocks,
            kv_blocks_total=pool.num_blocks,
            kv_blocks_used=used,
            kv_blocks_cached=cached,
            preemptions=self.preemptions,
            step_preemptions=self._step_preemptions,
            kv_books_error=self._idle_books_error(used),
            running_adapters=_adapter_names(self.running),
            waiting_adapters=_adapter_names(self.waiting),
        )
        return stats

    def _idle_books_error(self, used: int) -> str | None:
        """With nothing running, every block must be free or a cached prefix: O(1) to check, so it
        runs after every step; only a leak pays for the pool's full accounting (O(blocks))."""
        if self.running or used == 0:
            return None
        try:
            self.pool.check([])
        except BlockAccountingError as exc:
            return str(exc)
        return f"{used} blocks are in use with no request running"


def _adapter_names(seqs: Iterable[Sequence]) -> tuple[str, ...]:
    """The adapter names of ``seqs``, each once, sorted (what the endpoint picker's LoRA affinity reads)."""
    return tuple(sorted({seq.request.adapter.name for seq in seqs if seq.request.adapter is not None}))
