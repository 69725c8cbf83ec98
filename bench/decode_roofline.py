"""decode_roofline: how close batch-1 decode gets to the memory-bandwidth bound, and batch scaling.

At batch 1 every decode step reads every weight once, so ``tokens/s x weight bytes per token`` is
the bandwidth decode achieves; it is divided by the bandwidth of a large tensor copy measured in the
same run (interleaved, repeated, medians) with the same thread count. Decode tokens/s comes from the
inter-token latency (prefill excluded) of the in-process engine on the plain base. The batch curve
shows tokens/s from batch 1 to 64 relative to batch 1.

    python -m bench.decode_roofline [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from pathlib import Path

import torch

from bench.op_profile import (
    GEMM,
    EngineProfile,
    add_profile,
    profile_flag,
    profile_shares,
    profile_table,
    shares,
)
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
from bench.workload import EngineBench, base_label, bench_prompt, decode_mode_flag, load_base, run_batch

GOAL_ROOFLINE = 0.8
"""Share of the measured memory bandwidth batch-1 decode should reach (the issue's goal)."""


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one batch-1 decode step reads: every parameter but the embedding table.

    The embedding lookup reads one row; a tied lm_head reads the whole table once (counted once).
    """
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if head.data_ptr() != embed.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def copy_bandwidth(device: str, megabytes: int, repeats: int = 5) -> float:
    """Bytes/s of ``dst.copy_(src)`` on a tensor far larger than caches (read + write counted)."""
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / median(times)


async def _decode_tps(bench: EngineBench, prompt: list[int], batch: int, max_tokens: int) -> float:
    """Decode tokens/s at a batch size: rows / median inter-token latency (prefill excluded)."""
    _, timings = await run_batch(bench.engine, prompt, max_tokens, [None] * batch)
    # Skip the first steps: rows join over the first iterations while the others prefill.
    skip = math.ceil(batch * len(prompt) / bench.engine.scheduler.prefill_chunk) + 1
    itls = [x for t in timings for x in t.itls[skip:]]
    return batch / median(itls)


async def _measure(args: argparse.Namespace, result: SuiteResult, tiny: Path | None) -> None:
    base = load_base(tiny)
    bench = EngineBench(
        base,
        args.device,
        max(args.batches),
        args.prompt_tokens + args.max_tokens + 8,
        decode_mode=args.decode_mode,
    )
    result.config["decode_mode"] = bench.engine.decode_mode  # as resolved (auto: by device)
    result.config["weight_bytes_per_token"] = weight_bytes_per_token(bench.engine.model)
    bench.engine.start()
    prompt = bench_prompt(base, args.prompt_tokens)
    try:
        await run_batch(bench.engine, prompt, 4, [None])  # warm-up
        for repeat in range(args.repeats):
            bandwidth = copy_bandwidth(args.device, args.copy_mb)
            tps = await _decode_tps(bench, prompt, 1, args.max_tokens)
            result.rows.append(
                {"kind": "roofline", "repeat": repeat, "copy_bytes_per_s": bandwidth, "tps": tps}
            )
            print(
                f"repeat {repeat}: copy {bandwidth / 1e9:.1f} GB/s, batch-1 decode {tps:.1f} tok/s",
                flush=True,
            )
            for batch in args.batches:
                tps = await _decode_tps(bench, prompt, batch, args.max_tokens)
                result.rows.append({"kind": "batch", "repeat": repeat, "batch": batch, "tps": tps})
                print(f"repeat {repeat}: batch {batch:>2} {tps:7.1f} tok/s", flush=True)
    finally:
        bench.stop()
    if args.profile:
        with EngineProfile() as profile:
            max_len = args.prompt_tokens + args.max_tokens + 8
            bench = EngineBench(
                base, args.device, 1, max_len, profile_dir=profile.folder, decode_mode=args.decode_mode
            )
            bench.engine.start()
            start = time.perf_counter()
            await run_batch(bench.engine, prompt, args.max_tokens, [None])
            wall = time.perf_counter() - start
            bench.stop()
            add_profile(result, "batch-1 decode", shares(profile.ops(), wall))


def roofline_fractions(result: SuiteResult) -> list[float]:
    per_token = result.config["weight_bytes_per_token"]
    return [r["tps"] * per_token / r["copy_bytes_per_s"] for r in result.rows if r["kind"] == "roofline"]


def run(args: argparse.Namespace, tiny: Path | None = None) -> SuiteResult:
    """Measure and fill the headline ratios."""
    args.batches = sorted({1, *args.batches})
    config = {
        "batches": args.batches,
        "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens,
        "copy_mb": args.copy_mb,
        "repeats": args.repeats,
        "base": base_label(tiny),
    }
    with measuring("decode_roofline", args, config) as result:
        asyncio.run(_measure(args, result, tiny))
    result.add_headline(
        "batch-1 decode bandwidth (tok/s x weight bytes/token) / tensor-copy bandwidth",
        median(roofline_fractions(result)),
        "x",
        GOAL_ROOFLINE,
    )
    gemm = profile_shares(result.rows, "batch-1 decode").get(GEMM)
    if gemm is not None:
        result.add_headline("share of batch-1 decode time in GEMMs (profile)", gemm, "")
    top = max(args.batches)
    result.add_headline(
        f"decode tok/s at batch {top} / batch 1",
        median(paired_ratios(result.rows, top, 1, key="tps", by="batch", kind="batch")),
        "x",
    )
    return result


def details(result: SuiteResult) -> str:
    per_token = result.config["weight_bytes_per_token"]
    roof = [r for r in result.rows if r["kind"] == "roofline"]
    bandwidth = median([r["copy_bytes_per_s"] for r in roof])
    tps1 = median([r["tps"] for r in roof])
    rows = [
        [
            b,
            median([r["tps"] for r in result.rows if r["kind"] == "batch" and r["batch"] == b]),
            median(paired_ratios(result.rows, b, 1, key="tps", by="batch", kind="batch")),
        ]
        for b in result.config["batches"]
    ]
    return (
        f"Weights read per batch-1 token: {per_token / 2**20:.0f} MiB; tensor-copy bandwidth (median): "
        f"{bandwidth / 1e9:.1f} GB/s; batch-1 decode: {tps1:.1f} tok/s, i.e. "
        f"{tps1 * per_token / 1e9:.1f} GB/s of weights. Upper bound at that bandwidth: "
        f"{bandwidth / per_token:.1f} tok/s.\n\n"
        + markdown_table(["batch", "decode tok/s", "speed-up vs batch 1"], rows)
        + "\n\n![batch scaling](batch_scaling.png)"
        + profile_table(result.rows, ["batch-1 decode"], "one extra batch-1 request, prefill included")
    )


def _plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = result.config["batches"]
    values = [
        median([r["tps"] for r in result.rows if r["kind"] == "batch" and r["batch"] == b]) for b in batches
    ]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(batches, values, marker="o", label="engine decode")
    ax.plot(batches, [values[0] * b for b in batches], linestyle=":", color="gray", label="linear in batch")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (rows decoding together)")
    ax.set_ylabel("decode tokens/s (median)")
    ax.legend()
    save_figure(fig, folder / "batch_scaling.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the --quick defaults filled in."""
    parser = common_arguments(__doc__.splitlines()[0])
    decode_mode_flag(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--copy-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=None)
    profile_flag(parser, "one more batch-1 request")
    args = parser.parse_args(argv)
    args.profile = (not args.quick) if args.profile is None else args.profile
    args.batches = args.batches or ([1, 4, 16, 64] if args.quick else [1, 2, 4, 8, 16, 32, 64])
    args.max_tokens = args.max_tokens or (24 if args.quick else 48)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


if __name__ == "__main__":
    suite_main(parse_args, run, details, _plot)
