"""head_of_line: a short request arriving while long ones run is not stuck behind them.

``--long`` requests of ``--long-tokens`` tokens (adapters round-robin, one on the plain base) start
together; once they are decoding, a ``--short-tokens`` request arrives. The headline is the short
request's latency (submit to last token) over the long requests' median duration, both measured in
the same run (median over repeats); TTFT and inter-token latency p50/p99 are reported per adapter.

    python -m bench.head_of_line [--device cpu|cuda] [--quick]
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
    percentile,
    save_figure,
    suite_main,
)
from bench.workload import (
    EngineBench,
    RequestTiming,
    base_label,
    bench_prompt,
    load_base,
    make_adapters,
    mixed_specs,
    run_request,
)

GOAL_SHORT_OVER_LONG = 0.2


async def _one_repeat(
    bench: EngineBench, prompt: list[int], args: argparse.Namespace, names: list[str]
) -> tuple[RequestTiming, list[RequestTiming]]:
    pool = [None, *(bench.handles[n] for n in names)]
    long_tasks = [
        asyncio.create_task(run_request(bench.engine, prompt, args.long_tokens, pool[i % len(pool)]))
        for i in range(args.long)
    ]
    # Arrive mid-run: after the long rows have been decoding for a while.
    while bench.engine.stats().batch_size < args.long:
        await asyncio.sleep(0.01)
    await asyncio.sleep(args.arrival_s)
    short = await run_request(bench.engine, prompt, args.short_tokens, bench.handles[names[0]])
    longs = list(await asyncio.gather(*long_tasks))
    return short, longs


async def _measure(args: argparse.Namespace, result: SuiteResult, tiny: Path | None) -> None:
    base = load_base(tiny)
    folders = make_adapters(base, mixed_specs(args.adapters), args.adapter_cache)
    bench = EngineBench(base, args.device, args.long + 1, args.prompt_tokens + args.long_tokens + 8)
    bench.load(folders)
    bench.engine.start()
    prompt = bench_prompt(base, args.prompt_tokens)
    names = list(folders)
    try:
        await run_request(bench.engine, prompt, 4, None)  # warm-up
        for repeat in range(args.repeats):
            short, longs = await _one_repeat(bench, prompt, args, names)
            long_durations = [t.finished - t.submitted for t in longs]
            short_latency = short.finished - short.submitted
            ratio = short_latency / median(long_durations)
            print(
                f"repeat {repeat}: short {short_latency:.2f} s, long median {median(long_durations):.2f} s, "
                f"ratio {ratio:.3f}",
                flush=True,
            )
            for kind, timing in [("short", short), *(("long", t) for t in longs)]:
                result.rows.append(
                    {
                        "repeat": repeat,
                        "kind": kind,
                        "adapter": timing.adapter or "base",
                        "latency_s": timing.finished - timing.submitted,
                        "ttft_s": timing.ttft,
                        "itl_s": timing.itls,
                        "tokens": timing.tokens,
                    }
                )
    finally:
        bench.stop()


def short_over_long(rows: list[dict]) -> list[float]:
    """Per repeat: short latency / median long duration."""
    out = []
    for repeat in sorted({r["repeat"] for r in rows}):
        shorts = [r["latency_s"] for r in rows if r["repeat"] == repeat and r["kind"] == "short"]
        longs = [r["latency_s"] for r in rows if r["repeat"] == repeat and r["kind"] == "long"]
        out.append(shorts[0] / median(longs))
    return out


def latency_table(rows: list[dict]) -> list[list[object]]:
    """Per (kind, adapter): TTFT and ITL p50/p99 in milliseconds."""
    table = []
    for kind, adapter in sorted({(r["kind"], r["adapter"]) for r in rows}):
        picked = [r for r in rows if r["kind"] == kind and r["adapter"] == adapter]
        ttft = [r["ttft_s"] * 1e3 for r in picked]
        itl = [x * 1e3 for r in picked for x in r["itl_s"]]
        table.append(
            [
                kind,
                adapter,
                len(picked),
                percentile(ttft, 50),
                percentile(ttft, 99),
                percentile(itl, 50),
                percentile(itl, 99),
            ]
        )
    return table


def run(args: argparse.Namespace, tiny: Path | None = None) -> SuiteResult:
    """Measure and fill the headline ratio."""
    config = {
        "long_requests": args.long,
        "long_tokens": args.long_tokens,
        "short_tokens": args.short_tokens,
        "arrival_s": args.arrival_s,
        "prompt_tokens": args.prompt_tokens,
        "adapters": args.adapters,
        "repeats": args.repeats,
        "base": base_label(tiny),
    }
    with measuring("head_of_line", args, config) as result:
        asyncio.run(_measure(args, result, tiny))
    result.add_headline(
        f"short ({args.short_tokens} tok) latency / long ({args.long_tokens} tok) duration",
        median(short_over_long(result.rows)),
        "x",
        GOAL_SHORT_OVER_LONG,
        higher_is_better=False,
    )
    return result


def details(result: SuiteResult) -> str:
    columns = ["request", "adapter", "n", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"]
    return (
        "Latency per request kind and adapter (all repeats):\n\n"
        + markdown_table(columns, latency_table(result.rows))
        + "\n\n![timeline](timeline.png)"
    )


def _plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r["repeat"] == 0]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, r in enumerate(sorted(rows, key=lambda r: r["kind"] == "short")):
        color = "tab:red" if r["kind"] == "short" else "tab:blue"
        ax.barh(i, r["latency_s"], color=color)
        ax.text(r["latency_s"], i, f" {r['kind']} ({r['adapter']})", va="center", fontsize=7)
    ax.set_xlabel("latency, submit to last token (s)")
    ax.set_yticks([])
    ax.set_title("Short request vs long requests already running (repeat 0)")
    save_figure(fig, folder / "timeline.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the --quick defaults filled in."""
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=None)
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--arrival-s", type=float, default=1.0, help="seconds after the long rows decode")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    args.long_tokens = args.long_tokens or (128 if args.quick else 256)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


if __name__ == "__main__":
    suite_main(parse_args, run, details, _plot)
