"""issue30_ab: before/after ratios of issue 30's engine changes, in one process, alternating.

On a shared machine absolute timings swing by several times between minutes, so every figure here is
a ratio of two code paths timed back to back on the same inputs in the same process, the order
alternating per repeat, reported as the median (and range) of the per-repeat ratios. It drives the
model runner directly (no server, no scheduler): what is timed is the forward pass.

- ``prefill``: a 700-token prompt's attention alone (one layer's SDPA, SmolLM2's 9 query and 3 KV
  heads) over an explicit causal mask (before) against SDPA's own ``is_causal`` (after,
  :func:`~lorayard.server.engine.paged_attention.causal_prefill_attention`); the whole 700-token
  prefill pass with each; and the same prompt in chunks of 256 against one pass.
- ``dtype``: the same passes with the base in float32 against bfloat16 (``--dtype bfloat16``): a
  700-token prefill, a decode step of 16 rows, a decode step of 1 row.

    python -m bench.issue30_ab [--repeats 5] [--out bench/results/issue30_ab]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from bench.workload import load_base
from lorayard.server.engine.engine import Engine
from lorayard.server.engine.model_runner import ModelRunner, PassRow
from lorayard.server.engine.paged_attention import PagedBatch
from lorayard.server.settings import Settings

PROMPT = 700
CONTEXT = 120
"""Keys each decode row sees (a short prompt plus some output)."""


def engine(dtype: str) -> Engine:
    """An engine over the embedded base (not started: its runner is driven directly); the parity
    probe runs at construction, against HF in the same dtype."""
    settings = Settings(
        device="cpu", max_batch_size=16, max_model_len=2048, kv_cache_memory_gb=0.5, dtype=dtype
    )
    return Engine.from_base(load_base(), settings.engine_config(), eos_token_ids={2})


@contextmanager
def masked_prefill() -> Iterator[None]:
    """The attention before issue 30: a fresh prompt's chunk goes through the masked kernels."""
    with mock.patch.object(PagedBatch, "fresh", property(lambda self: False)):
        yield


def sdpa(causal: bool, length: int = PROMPT, repeats: int = 10) -> Callable[[], None]:
    """One layer's prefill attention over ``length`` tokens, with the mask spelled out or is_causal."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, length, 64, generator=gen) for heads in (9, 3, 3))
    mask = (torch.arange(length)[None, :] <= torch.arange(length)[:, None]).view(1, 1, length, length)

    def run() -> None:
        for _ in range(repeats):
            if causal:
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return run


def blocks(runner: ModelRunner, first: int, tokens: int) -> list[int]:
    return list(range(first, first + -(-tokens // runner.block_size)))


def prefill(runner: ModelRunner, ids: list[int], chunk: int) -> None:
    table = blocks(runner, 1, len(ids))
    for start in range(0, len(ids), chunk):
        end = min(start + chunk, len(ids))
        runner.forward([PassRow(ids[start:end], start, table, None, "last" if end == len(ids) else "none")])


def decode(runner: ModelRunner, rows: int, steps: int = 4) -> None:
    size = blocks(runner, 0, CONTEXT + 1)
    batch = [
        PassRow([5 + r], CONTEXT, blocks(runner, 60 + r * len(size), CONTEXT + 1), None) for r in range(rows)
    ]
    for _ in range(steps):
        runner.forward(batch)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(
    name: str, before: Callable[[], None], after: Callable[[], None], repeats: int
) -> dict[str, object]:
    """before / after time ratios over ``repeats`` alternating pairs (one warm-up pair first)."""
    before()
    after()
    ratios, times = [], []
    for r in range(repeats):
        if r % 2 == 0:
            b, a = timed(before), timed(after)
        else:
            a, b = timed(after), timed(before)
        ratios.append(b / a)
        times.append((b, a))
    row = {
        "figure": name,
        "speedup_median": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "seconds_before_after": times,
    }
    print(f"{name}: {row['speedup_median']:.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["prefill", "dtype"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="write result.json and table.md here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = torch.randint(100, 40000, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    f32 = engine("float32").runner
    rows = []
    if args.only in (None, "prefill"):
        rows.append(
            compare(
                "700-token attention (SDPA), is_causal vs mask", sdpa(False), sdpa(True), 3 * args.repeats
            )
        )

        def masked() -> None:
            with masked_prefill():
                prefill(f32, ids, PROMPT)

        rows.append(
            compare(
                "700-token prefill, causal kernel vs mask",
                masked,
                lambda: prefill(f32, ids, PROMPT),
                args.repeats,
            )
        )
        rows.append(
            compare(
                "700-token prefill, one pass vs chunks of 256",
                lambda: prefill(f32, ids, 256),
                lambda: prefill(f32, ids, PROMPT),
                args.repeats,
            )
        )
    if args.only in (None, "dtype"):
        bf16 = engine("bfloat16").runner
        rows.append(
            compare(
                "700-token prefill, bf16 vs fp32",
                lambda: prefill(f32, ids, PROMPT),
                lambda: prefill(bf16, ids, PROMPT),
                args.repeats,
            )
        )
        rows.append(
            compare(
                "decode step, 16 rows, bf16 vs fp32",
                lambda: decode(f32, 16),
                lambda: decode(bf16, 16),
                args.repeats,
            )
        )
        rows.append(
            compare(
                "decode step, 1 row, bf16 vs fp32",
                lambda: decode(f32, 1, 16),
                lambda: decode(bf16, 1, 16),
                args.repeats,
            )
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        machine = {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        }
        (args.out / "result.json").write_text(
            json.dumps({"machine": machine, "repeats": args.repeats, "rows": rows}, indent=1) + "\n"
        )
        lines = ["| figure (speedup: before / after time) | median | range |", "|---|---|---|"]
        lines += [
            f"| {r['figure']} | {r['speedup_median']:.2f}x | {r['speedup_min']:.2f}-{r['speedup_max']:.2f} |"
            for r in rows
        ]
        (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
