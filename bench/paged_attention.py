"""paged_attention: how to read K/V through block tables, measured per attention call of one layer.

Shapes of the embedded base (9 query heads, 3 KV heads, head dim 64, float32), 16-token blocks
scattered over the pool. Decode cases: R rows of random lengths up to L; prefill cases: R requests'
chunks packed in one pass over cached prefixes. Variants, interleaved and repeated, median time per
call (the gather included, the host-side metadata not):

* dense_view: the slot cache the paged KV cache replaced (304e28a), each request's K/V contiguous,
  read as a view (the floor: no copy); decode rows as one contiguous range of slots, prefill one
  request per call as it did;
* dense_gather (decode): that slot cache when the rows' slots are not one range (a copy);
* paged: ``lorayard.server.engine.paged_attention`` over [kv_heads, num_blocks, block_size, hd] blocks: one
  gather into a padded [R, kv_heads, L, hd] view, one attention call (prefill: padded, or per
  request when padding would more than double the work);
* padded / per_request (prefill): each of paged's two prefill strategies forced;
* per_row (decode): one gather and one attention call per row;
* token_major: one gather over [num_blocks, block_size, kv_heads, hd] blocks (vLLM's layout), the
  padded attention over the strided result;
* head_major: blocks [num_blocks, kv_heads, block_size, hd], an extra copy to merge the block axes;
* flex (``--flex``): ``torch.compile(flex_attention)`` over paged's gather with a length block mask,
  at the first decode case only (it compiles per shape).

Every variant's output is checked against paged before timing.

    python -m bench.paged_attention [--device cpu|cuda] [--quick] [--flex]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.record import (
    SuiteResult,
    common_arguments,
    markdown_table,
    measuring,
    median,
    save_figure,
    suite_main,
)
from lorayard.server.engine.paged_attention import (
    PagedBatch,
    gather_kv,
    padded_prefill_attention,
    paged_attention,
    per_request_attention,
)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
"""SmolLM2-135M's attention shape; the block size is block_pool.DEFAULT_BLOCK_SIZE."""


@dataclass
class Case:
    """One attention call's inputs in every layout the variants read."""

    name: str
    kind: str
    batch: PagedBatch
    q: torch.Tensor
    """[T, heads, hd] packed new tokens."""
    k: torch.Tensor
    v: torch.Tensor
    """[kv_heads, num_blocks, bs, hd]: the engine's block layout."""
    k_tok: torch.Tensor
    v_tok: torch.Tensor
    """[num_blocks, bs, kv_heads, hd]: the same content token-major."""
    k_head: torch.Tensor
    v_head: torch.Tensor
    """[num_blocks, kv_heads, bs, hd]: the same content head-major per block."""
    k_dense: torch.Tensor
    v_dense: torch.Tensor
    """[R, kv_heads, max_len, hd]: the same content in today's slot layout."""
    slots: torch.Tensor
    """[R]: a shuffled slot order, for the dense_gather variant."""


def make_case(
    name: str, kind: str, context_lens: list[int], query_lens: list[int], device: str, seed: int
) -> Case:
    """Random K/V for R requests whose blocks are a random scattering of a pool just big enough."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per = [-(-n // BLOCK) for n in context_lens]
    order = torch.randperm(sum(blocks_per), generator=gen).tolist()
    tables, start = [], 0
    for n in blocks_per:
        tables.append(order[start : start + n])
        start += n
    shape = (KV_HEADS, sum(blocks_per), BLOCK, HEAD_DIM)
    k = torch.randn(*shape, generator=gen).to(device)
    v = torch.randn(*shape, generator=gen).to(device)
    q = torch.randn(sum(query_lens), HEADS, HEAD_DIM, generator=gen).to(device)
    batch = PagedBatch.build(tables, context_lens, query_lens, BLOCK, device)
    longest = max(context_lens)
    tok, head = (1, 2, 0, 3), (1, 0, 2, 3)
    return Case(
        name,
        kind,
        batch,
        q,
        k,
        v,
        k.permute(tok).contiguous(),
        v.permute(tok).contiguous(),
        k.permute(head).contiguous(),
        v.permute(head).contiguous(),
        gather_kv(k, batch.block_tables, longest).contiguous(),
        gather_kv(v, batch.block_tables, longest).contiguous(),
        torch.randperm(len(context_lens), generator=gen).to(device),
    )


def cases(quick: bool, device: str) -> list[Case]:
    """Decode at the sizes the engine runs; prefill as a burst of newcomers and as mixed chunks."""
    gen = torch.Generator().manual_seed(1)

    def lengths(rows: int, longest: int) -> list[int]:
        return torch.randint(longest // 2, longest + 1, (rows,), generator=gen).tolist()

    if quick:
        return [
            make_case("decode R=4 L<=64", "decode", lengths(4, 64), [1] * 4, device, 0),
            make_case("prefill R=3 chunks 16", "prefill", [16, 40, 20], [16, 16, 16], device, 1),
        ]
    decode = [(16, 512), (16, 2048), (64, 512)]
    out = [
        make_case(f"decode R={r} L<={n}", "decode", lengths(r, n), [1] * r, device, i)
        for i, (r, n) in enumerate(decode)
    ]
    # a burst of 16 newcomers: 32-token chunks behind a 700-token cached system prompt
    out.append(
        make_case("prefill burst R=16 chunks 32 (+700 cached)", "prefill", [732] * 16, [32] * 16, device, 7)
    )
    mixed = [256, 64, 200, 32]
    out.append(
        make_case(
            "prefill mixed R=4 chunks 32-256",
            "prefill",
            [c + p for c, p in zip(mixed, [0, 512, 100, 900], strict=True)],
            mixed,
            device,
            8,
        )
    )
    return out


# -- variants: each returns the [T, heads, hd] output, or None where it does not apply -----------


def paged(case: Case) -> torch.Tensor:
    return paged_attention(case.q, case.k, case.v, case.batch)


def padded(case: Case) -> torch.Tensor | None:
    return None if case.batch.is_decode else padded_prefill_attention(case.q, case.k, case.v, case.batch)


def per_request(case: Case) -> torch.Tensor | None:
    return None if case.batch.is_decode else per_request_attention(case.q, case.k, case.v, case.batch)


def per_row(case: Case) -> torch.Tensor | None:
    return per_request_attention(case.q, case.k, case.v, case.batch) if case.batch.is_decode else None


def token_major(case: Case) -> torch.Tensor:
    """One gather of [R, M, bs, kv_heads, hd], viewed as [R, kv_heads, L, hd] (token stride kv_heads * hd)."""
    r, m = case.batch.block_tables.shape

    def gather(cache: torch.Tensor) -> torch.Tensor:
        g = cache[case.batch.block_tables].view(r, m * BLOCK, KV_HEADS, HEAD_DIM)
        return g[:, : case.batch.max_context_len].transpose(1, 2)

    return _attend_padded(case, gather(case.k_tok), gather(case.v_tok))


def head_major(case: Case) -> torch.Tensor:
    """One gather of [R, M, kv_heads, bs, hd] and a second copy to merge M and bs."""
    r, m = case.batch.block_tables.shape

    def gather(cache: torch.Tensor) -> torch.Tensor:
        g = cache[case.batch.block_tables]
        return g.permute(0, 2, 1, 3, 4).reshape(r, KV_HEADS, m * BLOCK, HEAD_DIM)[
            :, :, : case.batch.max_context_len
        ]

    return _attend_padded(case, gather(case.k_head), gather(case.v_head))


def dense_view(case: Case) -> torch.Tensor:
    """The former slot cache read as views: decode rows as one contiguous slot range, prefill per
    request."""
    batch = case.batch
    if batch.is_decode:
        length = batch.max_context_len
        return _attend_padded(case, case.k_dense[:, :, :length], case.v_dense[:, :, :length])
    outs, start = [], 0
    for r, (new, context) in enumerate(zip(batch.query_lens, batch.context_list, strict=True)):
        rows = case.q[start : start + new].transpose(0, 1)[None]
        start += new
        positions = torch.arange(context - new, context, device=rows.device)
        mask = torch.arange(context, device=rows.device)[None, :] <= positions[:, None]
        keys, values = case.k_dense[r : r + 1, :, :context], case.v_dense[r : r + 1, :, :context]
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def dense_gather(case: Case) -> torch.Tensor | None:
    """The slot cache's decode when the rows' slots are not one range: index it (a copy)."""
    if not case.batch.is_decode:
        return None
    length = case.batch.max_context_len
    order = torch.argsort(case.slots)  # rows stored at shuffled slots; put the result back in row order
    keys = case.k_dense[case.slots, :, :length][order]
    values = case.v_dense[case.slots, :, :length][order]
    return _attend_padded(case, keys, values)


def _attend_padded(case: Case, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """paged_attention's attention over keys/values already in [R, kv_heads, L, hd]."""
    batch = case.batch
    r = len(batch.query_lens)
    length = batch.max_context_len
    if batch.is_decode:
        visible = torch.arange(length, device=keys.device)[None, :] < batch.context_lens[:, None]
        grouped = case.q.view(r, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=visible[:, None, None, :])
        return out.reshape(r, HEADS, HEAD_DIM)
    max_q = batch.max_query_len
    rows = case.q.new_zeros(r * max_q, HEADS, HEAD_DIM)
    rows[batch.pad_index] = case.q
    query_pos = torch.zeros(r * max_q, dtype=torch.long, device=keys.device)
    query_pos[batch.pad_index] = batch.positions
    mask = (torch.arange(length, device=keys.device)[None, :] <= query_pos[:, None]).view(r, 1, max_q, length)
    out = F.scaled_dot_product_attention(
        rows.view(r, max_q, HEADS, HEAD_DIM).transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(r * max_q, HEADS, HEAD_DIM)[batch.pad_index]


def flex_variant() -> tuple[Callable[[Case], torch.Tensor], Callable[[], float]]:
    """Compiled flex_attention over paged's gather; also returns the first call's (compile) time."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    compile_s = [0.0]

    def run(case: Case) -> torch.Tensor:
        batch = case.batch
        r, length = len(batch.query_lens), batch.max_context_len
        lens = batch.context_lens

        def visible(
            b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            return kv_idx < lens[b]

        mask = create_block_mask(visible, r, None, 1, length, device=str(case.q.device))
        keys = gather_kv(case.k, batch.block_tables, length)
        values = gather_kv(case.v, batch.block_tables, length)
        out = compiled(case.q.view(r, HEADS, 1, HEAD_DIM), keys, values, block_mask=mask, enable_gqa=True)
        return out.reshape(r, HEADS, HEAD_DIM)

    def timed_first(case: Case) -> torch.Tensor:
        if compile_s[0] == 0.0:
            start = time.perf_counter()
            out = run(case)
            compile_s[0] = time.perf_counter() - start
            return out
        return run(case)

    return timed_first, lambda: compile_s[0]


VARIANTS: dict[str, Callable[[Case], torch.Tensor | None]] = {
    "dense_view": dense_view,
    "dense_gather": dense_gather,
    "paged": paged,
    "padded": padded,
    "per_request": per_request,
    "per_row": per_row,
    "token_major": token_major,
    "head_major": head_major,
}


def _time_call(fn: Callable[[Case], torch.Tensor | None], case: Case, calls: int, device: str) -> float:
    """Median seconds per call over ``calls`` calls."""
    times = []
    for _ in range(calls):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(case)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return median(times)


@torch.inference_mode()
def _measure(args: argparse.Namespace, result: SuiteResult) -> None:
    all_cases = cases(args.quick, args.device)
    variants: dict[str, Callable[[Case], torch.Tensor | None]] = dict(VARIANTS)
    flex_compile: Callable[[], float] | None = None
    if args.flex:
        variants["flex"], flex_compile = flex_variant()
    applies: dict[tuple[str, str], bool] = {}
    for case in all_cases:
        reference = paged(case)
        for name, fn in variants.items():
            out = fn(case) if name != "flex" or case is all_cases[0] else None  # also the warm-up
            applies[case.name, name] = out is not None
            if out is not None:
                torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    if flex_compile is not None:
        result.config["flex_compile_s"] = flex_compile()
    for repeat in range(args.repeats):
        for case in all_cases:
            names = [n for n in variants if applies[case.name, n]]
            names = names[repeat % len(names) :] + names[: repeat % len(names)]  # rotate the order
            for name in names:
                seconds = _time_call(variants[name], case, args.calls, args.device)
                result.rows.append(
                    {"case": case.name, "kind": case.kind, "variant": name, "repeat": repeat, "s": seconds}
                )
                print(f"repeat {repeat} {case.name:45} {name:12} {seconds * 1e3:8.3f} ms", flush=True)


def ratio(result: SuiteResult, case: str, numerator: str, denominator: str) -> float:
    """Median over repeats of time(numerator) / time(denominator) on one case."""
    by_repeat: dict[int, dict[str, float]] = {}
    for row in result.rows:
        if row["case"] == case:
            by_repeat.setdefault(row["repeat"], {})[row["variant"]] = row["s"]
    return median(
        [v[numerator] / v[denominator] for v in by_repeat.values() if numerator in v and denominator in v]
    )


def run(args: argparse.Namespace, tiny: Path | None = None) -> SuiteResult:
    """Measure and fill the headline ratios (``tiny`` is unused: no model is loaded)."""
    config = {
        "heads": HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "block_size": BLOCK,
        "dtype": "float32",
        "calls": args.calls,
        "repeats": args.repeats,
        "flex": args.flex,
    }
    with measuring("paged_attention", args, config) as result:
        _measure(args, result)
    names = list(dict.fromkeys(r["case"] for r in result.rows))
    decode = [n for n in names if n.startswith("decode")]
    prefill = [n for n in names if n.startswith("prefill")]
    main_decode = decode[1] if len(decode) > 1 else decode[0]
    for slower in ("token_major", "head_major", "per_row"):
        result.add_headline(
            f"{slower} / paged time, {main_decode}", ratio(result, main_decode, slower, "paged"), "x"
        )
    result.add_headline(
        f"paged / dense_gather (today's copying path) time, {main_decode}",
        ratio(result, main_decode, "paged", "dense_gather"),
        "x",
    )
    result.add_headline(
        f"paged / dense_view (today's no-copy path) time, {main_decode}",
        ratio(result, main_decode, "paged", "dense_view"),
        "x",
    )
    for case in prefill:
        result.add_headline(
            f"per_request / paged time, {case}", ratio(result, case, "per_request", "paged"), "x"
        )
        result.add_headline(f"padded / paged time, {case}", ratio(result, case, "padded", "paged"), "x")
    return result


def details(result: SuiteResult) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in result.rows))
    names = list(dict.fromkeys(r["case"] for r in result.rows))
    rows = []
    for case in names:
        cells: list[object] = [case]
        for variant in variants:
            times = [r["s"] for r in result.rows if r["case"] == case and r["variant"] == variant]
            cells.append(median(times) * 1e3 if times else "")
        rows.append(cells)
    flex = result.config.get("flex_compile_s")
    note = f"\n\nflex: first call (compile) {flex:.0f} s." if flex else ""
    return (
        "Median ms per attention call (one layer):\n\n"
        + markdown_table(["case", *variants], rows)
        + note
        + "\n\n![times](times.png)"
    )


def _plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in result.rows))
    names = list(dict.fromkeys(r["case"] for r in result.rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = [
            median(
                [r["s"] * 1e3 for r in result.rows if r["case"] == c and r["variant"] == variant]
                or [float("nan")]
            )
            for c in names
        ]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=variant)
    ax.set_xticks(
        [x + 0.4 - width / 2 for x in range(len(names))], names, rotation=15, ha="right", fontsize=7
    )
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (median)")
    ax.legend(fontsize=8)
    save_figure(fig, folder / "times.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the --quick defaults filled in."""
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=None, help="timed calls per variant and repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--flex", action="store_true", help="also compiled flex_attention (compiles minutes)")
    args = parser.parse_args(argv)
    args.calls = args.calls or (3 if args.quick else 10)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


if __name__ == "__main__":
    suite_main(parse_args, run, details, _plot)
