"""Scheduler policy without a model: admission, the pass plan, preemption and retirement over a real
(tiny) block pool; a step is simulated by marking the plan computed and appending a token per sampled
row, as the engine does after its forward pass."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from lorayard.server.adapters.registry import AdapterLease
from lorayard.server.engine.block_pool import BlockPool
from lorayard.server.engine.scheduler import PlannedRow, Scheduler, Sequence
from lorayard.server.engine.types import Request, SamplingParams

BS = 4


def make_seq(request_id: str, prompt: list[int], max_tokens: int = 8, **params: Any) -> Sequence:
    request = Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **params))
    return Sequence(request, pool_id=f"{request_id}#0", identity=None, output_ids=[])


def make_scheduler(
    num_blocks: int, *, max_batch_size: int = 8, prefill_chunk: int = 64
) -> Scheduler[Sequence]:
    return Scheduler(BlockPool(num_blocks, BS), max_batch_size=max_batch_size, prefill_chunk=prefill_chunk)


def step(scheduler: Scheduler[Sequence], token: int = 7) -> tuple[list[PlannedRow[Sequence]], list[Sequence]]:
    """One engine step without a model: plan, mark computed, one new token per sampled row, make
    room for it. -> (the plan, the requests preempted)."""
    planned = scheduler.schedule()
    preempted: list[Sequence] = []
    for row in planned:
        scheduler.computed(row)
    for row in planned:
        seq = row.seq
        if row.samples and seq.table is not None:
            seq.output_ids.append(token)
            preempted += scheduler.make_room(seq)
    return planned, preempted


def test_scheduler_does_not_import_torch():
    code = "import sys, lorayard.server.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_admission_is_fifo_within_the_batch_limit():
    scheduler = make_scheduler(16, max_batch_size=2)
    seqs = [make_seq(name, [1, 2, 3]) for name in "abc"]
    for seq in seqs:
        scheduler.add(seq)
    planned = scheduler.schedule()
    assert [row.seq for row in planned] == seqs[:2]
    assert list(scheduler.waiting) == seqs[2:] and scheduler.step_admissions == 2
    stats = scheduler.stats()
    assert (stats.running, stats.waiting, stats.batch_size) == (2, 1, 2)


def test_a_request_that_does_not_fit_blocks_the_queue_behind_it():
    """FIFO: a small request never overtakes a large one the pool cannot hold yet."""
    scheduler = make_scheduler(4)
    first, large, small = make_seq("first", [1] * 6), make_seq("large", [2] * 9), make_seq("small", [3])
    for seq in (first, large, small):
        scheduler.add(seq)
    scheduler.schedule()
    # first: 2 prompt blocks + 1 of headroom; large needs 3 + 1 of the 2 left
    assert scheduler.running == [first] and list(scheduler.waiting) == [large, small]


def test_the_plan_chunks_prompts_within_the_budget_and_decodes_one_token_per_row():
    scheduler = make_scheduler(32, prefill_chunk=8)
    decoding, long_a, long_b = make_seq("decoding", [1, 2]), make_seq("a", [5] * 10), make_seq("b", [6] * 10)
    scheduler.add(decoding)
    step(scheduler)  # decoding: prefilled, one token sampled
    scheduler.add(long_a)
    scheduler.add(long_b)
    planned, _ = step(scheduler)
    plan = {row.seq.request.request_id: (row.start, len(row.ids), row.logits, row.samples) for row in planned}
    # one token for the decoding row; 8 prompt tokens of "a" (oldest first), none left for "b"
    assert plan == {"decoding": (2, 1, "last", True), "a": (0, 8, "none", False)}
    planned, _ = step(scheduler)
    plan = {row.seq.request.request_id: (row.start, len(row.ids), row.logits, row.samples) for row in planned}
    assert plan == {"decoding": (3, 1, "last", True), "a": (8, 2, "last", True), "b": (0, 6, "none", False)}


def test_prompt_logprobs_take_every_position_and_no_cached_prefix():
    scheduler = make_scheduler(16)
    prompt = [1] * 9
    warm = make_seq("warm", prompt, max_tokens=1)
    scheduler.add(warm)
    step(scheduler)
    scheduler.retire(warm)  # its two full blocks stay cached
    scorer, plain = make_seq("scorer", prompt, prompt_logprobs=1), make_seq("plain", prompt)
    scheduler.add(scorer)
    scheduler.add(plain)
    planned = scheduler.schedule()
    rows = {row.seq.request.request_id: row for row in planned}
    assert rows["scorer"].start == 0 and rows["scorer"].logits == "all"
    assert rows["plain"].start == 2 * BS and plain.cached_tokens == 2 * BS


def test_the_newest_request_is_preempted_and_readmitted_first():
    """4 blocks, two requests growing a block each every 4 tokens: when the pool is dry the most
    recently admitted one is preempted, queued first, and readmitted once the oldest finishes."""
    scheduler = make_scheduler(4)
    old, new, later = make_seq("old", [1, 2, 3], 20), make_seq("new", [4, 5, 6], 20), make_seq("later", [9])
    scheduler.add(old)
    scheduler.add(new)
    preempted: list[Sequence] = []
    while not preempted:
        _, preempted = step(scheduler)
    assert preempted == [new] and new.table is None and scheduler.running == [old]
    assert scheduler.stats().step_preemptions == 1 and scheduler.stats().preemptions == 1
    scheduler.add(later)
    assert list(scheduler.waiting) == [new, later]
    scheduler.retire(old)
    planned = scheduler.schedule()
    assert scheduler.stats().step_preemptions == 0  # a new step starts its own count
    row = next(row for row in planned if row.seq is new)
    # recomputed: its first block from the prefix cache (the second was full but its last token's
    # K/V not yet written, so never cached), the rest prefilled
    assert row.start == BS and row.ids == new.tokens[BS:]
    scheduler.pool.check([s.pool_id for s in scheduler.running])


def test_a_row_that_is_itself_the_newest_preempts_itself():
    scheduler = make_scheduler(2)
    only = make_seq("only", [1, 2, 3], 20)
    scheduler.add(only)
    preempted: list[Sequence] = []
    while not preempted:
        _, preempted = step(scheduler)
    assert preempted == [only] and list(scheduler.waiting) == [only] and not scheduler.running


def test_aborts_retire_waiting_and_running_requests_and_free_their_blocks():
    scheduler = make_scheduler(16, max_batch_size=1)
    running, waiting, stays = make_seq("r", [1, 2]), make_seq("w", [3, 4]), make_seq("s", [5])
    for seq in (running, waiting, stays):
        scheduler.add(seq)
    step(scheduler)
    aborted = scheduler.abort({"r", "w", "unknown"})
    assert aborted == [waiting, running] and all(seq.finished for seq in aborted)
    assert running.table is None and list(scheduler.waiting) == [stays]
    scheduler.pool.check([])
    assert scheduler.abort({"r"}) == []  # retired once: nothing left to abort


def test_the_snapshot_reports_a_leak_once_idle():
    scheduler = make_scheduler(8)
    seq = make_seq("a", [1, 2, 3], 2)
    scheduler.add(seq)
    step(scheduler)
    assert scheduler.stats().kv_books_error is None  # running: blocks in use are expected
    scheduler.retire(seq)
    stats = scheduler.stats()
    assert stats.idle and stats.kv_books_error is None and stats.kv_blocks_used == 0
    scheduler.pool.admit("leaked#0", [1, 2, 3], None)  # blocks nobody running holds
    error = scheduler.stats().kv_books_error
    assert error is not None and "leaked#0" in error


def test_the_snapshot_names_the_adapters_running_and_waiting():
    """Each adapter once, sorted, the base model none: the endpoint picker's LoRA affinity reads these."""

    def lease(name: str, version: int) -> AdapterLease:
        return AdapterLease(name, version, f"{name}@v{version}", slot=version)

    scheduler = make_scheduler(16, max_batch_size=3)
    adapters = [lease("b", 1), lease("a", 2), None, lease("b", 2), lease("c", 1)]
    for i, adapter in enumerate(adapters):
        seq = make_seq(f"r{i}", [1, 2, 3])
        seq.request.adapter = adapter
        scheduler.add(seq)
    scheduler.schedule()
    stats = scheduler.stats()
    assert stats.running_adapters == ("a", "b") and stats.waiting_adapters == ("b", "c")
    for seq in list(scheduler.running):
        scheduler.retire(seq)
    stats = scheduler.stats()
    assert stats.running_adapters == () and stats.waiting_adapters == ("b", "c")


def _plan_of(planned: list[PlannedRow[Sequence]]) -> dict[str, tuple[int, int, str, bool]]:
    return {row.seq.request.request_id: (row.start, len(row.ids), row.logits, row.samples) for row in planned}


def test_with_no_row_decoding_a_prompt_takes_the_idle_budget_in_one_pass():
    """No stream waits on a pass without decoding rows, so it may prefill up to ``idle_prefill_chunk``
    (oldest first); once a row decodes, newcomers are chunked to ``prefill_chunk`` beside it."""
    scheduler = Scheduler(BlockPool(64, BS), max_batch_size=8, prefill_chunk=8, idle_prefill_chunk=32)
    first, second = make_seq("first", [5] * 20), make_seq("second", [6] * 20)
    scheduler.add(first)
    scheduler.add(second)
    planned, _ = step(scheduler)
    assert _plan_of(planned) == {"first": (0, 20, "last", True), "second": (0, 12, "none", False)}
    newcomer = make_seq("newcomer", [7] * 20)
    scheduler.add(newcomer)
    planned, _ = step(scheduler)  # "first" decodes now: the small budget again
    assert _plan_of(planned) == {"first": (20, 1, "last", True), "second": (12, 8, "last", True)}


def test_the_idle_budget_is_never_below_the_chunk():
    pool = BlockPool(4, BS)
    assert Scheduler(pool, max_batch_size=1, prefill_chunk=8, idle_prefill_chunk=2).idle_prefill_chunk == 8
    assert Scheduler(pool, max_batch_size=1, prefill_chunk=8).idle_prefill_chunk == 8
