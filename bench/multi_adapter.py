"""multi_adapter: output tokens/s of the in-process engine, base only vs 1, 4 and 16 mixed adapters.

Each variant runs ``concurrency`` greedy ``ignore_eos`` requests of ``--max-tokens`` tokens at once on
one engine (all adapters resident; ranks 8-64, all-linear and q/v alternating, round-robin over the
requests). Variants are interleaved (rotating order) and repeated; the headline is the median of the
per-repeat ratios ``variant tok/s / base tok/s`` measured back to back.

    python -m bench.multi_adapter [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from bench.record import (
    SuiteResult,
    common_arguments,
    markdown_table,
    measuring,
    median,
    paired_ratios,
    save_figure,
    suite_main,
)
from bench.workload import (
    WARMUP_TOKENS,
    EngineBench,
    base_label,
    bench_prompt,
    decode_mode_flag,
    load_base,
    make_adapters,
    mixed_specs,
    run_batch,
)

VARIANTS = {"base": 0, "1 adapter": 1, "4 mixed": 4, "16 mixed": 16}
"""Variant name -> number of distinct adapters (0: the plain base)."""
GOAL_4_MIXED_VS_BASE = 0.85


def _plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrencies = result.config["concurrency"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        values = [
            median(
                [r["tokens_per_s"] for r in result.rows if r["variant"] == variant and r["concurrency"] == c]
            )
            for c in concurrencies
        ]
        ax.bar([j + i * width for j in range(len(concurrencies))], values, width, label=variant)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(concurrencies))], [str(c) for c in concurrencies])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s (median)")
    ax.set_title("Engine throughput: base vs mixed adapters")
    ax.legend()
    save_figure(fig, folder / "throughput.png")


async def _measure(args: argparse.Namespace, result: SuiteResult, tiny: Path | None) -> None:
    base = load_base(tiny)
    folders = make_adapters(base, mixed_specs(max(VARIANTS.values())), args.adapter_cache)
    bench = EngineBench(
        base,
        args.device,
        max(args.concurrency),
        args.prompt_tokens + args.max_tokens + 8,
        decode_mode=args.decode_mode,
        max_loaded_adapters=len(folders),  # every adapter stacked: 16 mixed decodes in the static step
    )
    result.config["decode_mode"] = bench.engine.decode_mode  # as resolved (auto: by device)
    bench.load(folders)
    bench.engine.start()
    names = list(folders)
    prompt = bench_prompt(base, args.prompt_tokens)
    try:
        pools = {v: [bench.handles[n] for n in names[:k]] or [None] for v, k in VARIANTS.items()}
        order = list(VARIANTS)
        # Warm-up (see WARMUP_TOKENS): every (concurrency, variant) once, untimed.
        for concurrency in args.concurrency:
            for pool in pools.values():
                warm = [pool[i % len(pool)] for i in range(concurrency)]
                await run_batch(bench.engine, prompt, WARMUP_TOKENS, warm)
        for repeat in range(args.repeats):
            for concurrency in args.concurrency:
                rotated = order[repeat % len(order) :] + order[: repeat % len(order)]
                for variant in rotated:
                    pool = pools[variant]
                    handles = [pool[i % len(pool)] for i in range(concurrency)]
                    tps, _ = await run_batch(bench.engine, prompt, args.max_tokens, handles)
                    result.rows.append(
                        {
                            "repeat": repeat,
                            "concurrency": concurrency,
                            "variant": variant,
                            "tokens_per_s": tps,
                        }
                    )
                    print(f"repeat {repeat} c={concurrency:>2} {variant:>10}: {tps:7.1f} tok/s", flush=True)
    finally:
        bench.stop()


def run(args: argparse.Namespace, tiny: Path | None = None) -> SuiteResult:
    """Measure, then fill headline figures; also used by the unit smoke test with a tiny base."""
    config = {
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "adapters": "ranks 8/16/32/64 cycling, all-linear and q/v alternating",
        "base": base_label(tiny),
    }
    with measuring("multi_adapter", args, config) as result:
        asyncio.run(_measure(args, result, tiny))
    top = max(args.concurrency)
    for variant in VARIANTS:
        if variant == "base":
            continue
        goal = GOAL_4_MIXED_VS_BASE if variant == "4 mixed" else None
        result.add_headline(
            f"{variant} / base tok/s at concurrency {top}",
            median(paired_ratios(result.rows, variant, "base", concurrency=top)),
            "x",
            goal,
        )
    return result


def details(result: SuiteResult) -> str:
    rows = []
    for c in result.config["concurrency"]:
        line: list[object] = [c]
        for variant in VARIANTS:
            tps = [
                r["tokens_per_s"] for r in result.rows if r["variant"] == variant and r["concurrency"] == c
            ]
            line.append(median(tps))
        line += [
            median(paired_ratios(result.rows, v, "base", concurrency=c)) for v in VARIANTS if v != "base"
        ]
        rows.append(line)
    columns = [
        "concurrency",
        *(f"{v} tok/s" for v in VARIANTS),
        *(f"{v}/base" for v in VARIANTS if v != "base"),
    ]
    return (
        "Median output tokens/s and median paired ratios:\n\n"
        + markdown_table(columns, rows)
        + ("\n\n![throughput](throughput.png)")
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the --quick defaults filled in."""
    parser = common_arguments(__doc__.splitlines()[0])
    decode_mode_flag(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or ([1, 16] if args.quick else [1, 4, 16])
    args.max_tokens = args.max_tokens or (32 if args.quick else 64)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


if __name__ == "__main__":
    suite_main(parse_args, run, details, _plot)
