"""naive: our engine vs plain PEFT serving the same mixed-adapter workload, in one process.

Workload: ``--requests`` greedy requests (same prompt, ``--max-tokens`` tokens, end-of-turn ignored)
round-robin over ``--adapters`` distinct adapters (ranks 8-64, all-linear and q/v alternating).

* engine: all requests submitted at once to the in-process engine (continuous batching);
* peft_sequential: one request at a time, ``set_adapter`` + ``generate`` (how a notebook serves);
  its tokens/s does not depend on the request count, so a subset (one request per adapter) is timed;
* peft_mixed_batch: PEFT's static mixed batch, ``generate(..., adapter_names=[...])`` over the whole
  batch padded left.

The three are interleaved and repeated; the headline is the median of per-repeat ratios.

    python -m bench.naive [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import torch

from bench.op_profile import (
    GEMM,
    EngineProfile,
    add_profile,
    profile_flag,
    profile_here,
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
from lorayard.base_model import default_dtype

VARIANTS = ("engine", "peft_sequential", "peft_mixed_batch")
WORKLOADS = ("equal", "mixed")
"""equal: every request asks for --max-tokens; mixed: uniform in [max_tokens/8, max_tokens] (seeded)."""
GOALS = {"peft_sequential": 5.0, "peft_mixed_batch": 2.0}
PROFILE_MAX_TOKENS = 8
"""Tokens per request in the profiled runs: the profiler keeps every op it records, and summarising a
full run (32 requests x 64 tokens, each variant) took over 20 GB."""


def request_lengths(workload: str, count: int, max_tokens: int) -> list[int]:
    """Each request's max_tokens for a workload (deterministic)."""
    if workload == "equal":
        return [max_tokens] * count
    rng = random.Random(0)
    return [rng.randint(max(1, max_tokens // 8), max_tokens) for _ in range(count)]


def _peft_model(base_path: Path, folders: dict[str, Path], device: str) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # The engine's dtype on this device (float32 on the CPU, bf16 on a GPU): like for like.
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=default_dtype(device)).to(device)
    names = list(folders)
    peft_model = PeftModel.from_pretrained(model, folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(folders[name], adapter_name=name)
    peft_model.eval()
    return peft_model


def _generate(model: torch.nn.Module, ids: torch.Tensor, max_tokens: int, **kwargs: object) -> None:
    """Greedy generate of exactly max_tokens new tokens per row (end-of-turn ignored)."""
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


def _peft_sequential(
    model: torch.nn.Module, ids: torch.Tensor, names: list[str], lengths: list[int]
) -> float:
    start = time.perf_counter()
    for name, length in zip(names, lengths, strict=True):
        model.set_adapter(name)
        _generate(model, ids, length)
    return sum(lengths) / (time.perf_counter() - start)


def _peft_mixed_batch(
    model: torch.nn.Module, ids: torch.Tensor, names: list[str], lengths: list[int], batch_size: int
) -> float:
    # Static batches in arrival order: a batch runs until its longest row is done and admits nothing
    # meanwhile; only the tokens each request asked for count. Every row has the same prompt, so left
    # padding is a no-op here (it would only cost the static batch more with varied prompts).
    start = time.perf_counter()
    for i in range(0, len(names), batch_size):
        chunk = names[i : i + batch_size]
        batch = ids.expand(len(chunk), -1).contiguous()
        _generate(model, batch, max(lengths[i : i + batch_size]), adapter_names=chunk)
    return sum(lengths) / (time.perf_counter() - start)


async def _measure(args: argparse.Namespace, result: SuiteResult, tiny: Path | None) -> None:
    base = load_base(tiny)
    folders = make_adapters(base, mixed_specs(args.adapters), args.adapter_cache)
    names = list(folders)
    request_names = [names[i % len(names)] for i in range(args.requests)]
    prompt = bench_prompt(base, args.prompt_tokens)
    ids = torch.tensor([prompt], device=args.device)
    peft_model = _peft_model(base.path, folders, args.device)
    bench = EngineBench(
        base,
        args.device,
        args.concurrency,
        args.prompt_tokens + args.max_tokens + 8,
        decode_mode=args.decode_mode,
    )
    result.config["decode_mode"] = bench.engine.decode_mode  # as resolved (auto: by device)
    bench.load(folders)
    bench.engine.start()
    handles = [bench.handles[n] for n in request_names]
    try:
        # Warm-up: each variant once, untimed (on a GPU a first run loads kernels and tunes GEMMs).
        warm = [WARMUP_TOKENS] * args.requests
        await run_batch(bench.engine, prompt, warm, handles)
        _peft_sequential(peft_model, ids, names, warm[: len(names)])
        _peft_mixed_batch(peft_model, ids, request_names, warm, args.concurrency)
        for repeat in range(args.repeats):
            for workload in WORKLOADS:
                lengths = request_lengths(workload, args.requests, args.max_tokens)
                # Sequential tok/s does not depend on the request count: one request per adapter.
                seq_lengths = lengths[: len(names)]
                rotated = VARIANTS[repeat % 3 :] + VARIANTS[: repeat % 3]
                for variant in rotated:
                    if variant == "engine":
                        tps, _ = await run_batch(bench.engine, prompt, lengths, handles)
                    elif variant == "peft_sequential":
                        tps = _peft_sequential(peft_model, ids, names, seq_lengths)
                    else:
                        tps = _peft_mixed_batch(peft_model, ids, request_names, lengths, args.concurrency)
                    result.rows.append(
                        {"repeat": repeat, "workload": workload, "variant": variant, "tokens_per_s": tps}
                    )
                    print(f"repeat {repeat} {workload:>5} {variant:>17}: {tps:7.1f} tok/s", flush=True)
    finally:
        bench.stop()
    if args.profile:
        lengths = [min(args.max_tokens, PROFILE_MAX_TOKENS)] * args.requests
        await _profile(args, result, base, folders, request_names, lengths, prompt)
        _profile_peft(args, result, peft_model, ids, request_names, lengths)


async def _profile(
    args: argparse.Namespace,
    result: SuiteResult,
    base: object,
    folders: dict[str, Path],
    request_names: list[str],
    lengths: list[int],
    prompt: list[int],
) -> None:
    """One more engine run of the equal workload, on a fresh engine that profiles its own thread."""
    with EngineProfile() as profile:
        max_len = args.prompt_tokens + args.max_tokens + 8
        bench = EngineBench(
            base,
            args.device,
            args.concurrency,
            max_len,
            profile_dir=profile.folder,
            decode_mode=args.decode_mode,
        )
        bench.load(folders)
        bench.engine.start()
        start = time.perf_counter()
        await run_batch(bench.engine, prompt, lengths, [bench.handles[n] for n in request_names])
        wall = time.perf_counter() - start
        bench.stop()
        add_profile(result, "engine", shares(profile.ops(), wall))


def _profile_peft(
    args: argparse.Namespace,
    result: SuiteResult,
    peft_model: torch.nn.Module,
    ids: torch.Tensor,
    request_names: list[str],
    lengths: list[int],
) -> None:
    ops, wall = profile_here(
        lambda: _peft_mixed_batch(peft_model, ids, request_names, lengths, args.concurrency)
    )
    add_profile(result, "peft_mixed_batch", shares(ops, wall))


def _median_tps(rows: list[dict], workload: str, variant: str) -> float:
    return median(
        [r["tokens_per_s"] for r in rows if r.get("workload") == workload and r["variant"] == variant]
    )


def run(args: argparse.Namespace, tiny: Path | None = None) -> SuiteResult:
    """Measure and fill the headline ratios (engine tok/s over each naive variant's, per workload)."""
    config = {
        "concurrency": args.concurrency,
        "requests": args.requests,
        "adapters": args.adapters,
        "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "workloads": {w: request_lengths(w, args.requests, args.max_tokens) for w in WORKLOADS},
        "base": base_label(tiny),
    }
    with measuring("naive", args, config) as result:
        asyncio.run(_measure(args, result, tiny))
    for workload in WORKLOADS:
        for variant, goal in GOALS.items():
            result.add_headline(
                f"engine / {variant} tok/s, {workload} lengths",
                median(paired_ratios(result.rows, "engine", variant, workload=workload)),
                "x",
                goal,
            )
    for variant in ("engine", "peft_mixed_batch"):
        gemm = profile_shares(result.rows, variant).get(GEMM)
        if gemm is not None:
            result.add_headline(f"share of {variant} time in GEMMs (profile, equal lengths)", gemm, "")
    return result


def details(result: SuiteResult) -> str:
    rows = [[w, *(_median_tps(result.rows, w, v) for v in VARIANTS)] for w in WORKLOADS]
    return (
        "Median output tokens/s per workload and variant (only requested tokens count):\n\n"
        + markdown_table(["workload", *(f"{v} tok/s" for v in VARIANTS)], rows)
        + "\n\n![naive](naive.png)"
        + profile_table(
            result.rows,
            ["engine", "peft_mixed_batch"],
            f"one extra run per variant, {PROFILE_MAX_TOKENS} tokens per request",
        )
    )


def _plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        values = [_median_tps(result.rows, w, variant) for w in WORKLOADS]
        ax.bar([j + i * width for j in range(len(WORKLOADS))], values, width, label=variant)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(WORKLOADS))], [f"{w} lengths" for w in WORKLOADS])
    ax.set_ylabel("output tokens/s (median)")
    ax.set_title(
        f"{result.config['requests']} requests, {result.config['adapters']} adapters, "
        f"batch {result.config['concurrency']}"
    )
    ax.legend()
    save_figure(fig, folder / "naive.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the --quick defaults filled in."""
    parser = common_arguments(__doc__.splitlines()[0])
    decode_mode_flag(parser)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=None, help="default: 2 x concurrency")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None)
    profile_flag(parser, "one more run of each batched variant")
    args = parser.parse_args(argv)
    args.profile = (not args.quick) if args.profile is None else args.profile
    args.max_tokens = args.max_tokens or (32 if args.quick else 64)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.requests = args.requests or 2 * args.concurrency
    return args


if __name__ == "__main__":
    suite_main(parse_args, run, details, _plot)
