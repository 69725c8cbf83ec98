"""stacked_lora: one decoder layer's LoRA deltas, the segment path against the stacked path's methods.

Every targetable linear of one decoder layer of the base (q/k/v and gate/up as fused groups, o and
down alone, as the model runner calls them) gets its rows' LoRA deltas added to a base output,
``--iters`` times, per variant: ``segment`` (lora_ops, a loop over the adapters present),
``stacked masked`` and ``stacked gather`` (:mod:`lorayard.server.engine.stacked_lora`, the static shapes a
CUDA graph can capture; each step's row selection included). Tokens are assigned to the adapters
round-robin, so a batch holds min(batch, adapters) of them. Adapters are bench.workload's mixed
specs (ranks 8/16/32/64 cycling, all-linear and q/v alternating) read from PEFT's files; the stack's
r_max is the largest rank present. Variants are interleaved (rotating order) and repeated; the
headline ratios are medians of per-repeat paired ratios ``segment time / stacked time`` (above 1:
the stack is faster).

    python -m bench.stacked_lora [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig

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
from bench.workload import base_label, load_base, make_adapters, mixed_specs
from lorayard.adapter_files import AdapterWeights, load_adapter
from lorayard.architectures import linear_shapes
from lorayard.server.engine.decode_graphs import DecodeGraphs, StaticInput
from lorayard.server.engine.lora_ops import (
    FUSED_GROUPS,
    ResidentAdapter,
    apply_lora,
    apply_lora_group,
    segments_of,
)
from lorayard.server.engine.stacked_lora import ZERO_ROW, StackedLora

METHODS = ("masked", "gather")
GRAPHED = "stacked masked, CUDA graph"
"""On a GPU only: the masked step captured by :class:`~lorayard.server.engine.decode_graphs.DecodeGraphs`."""


def variants(device: str) -> tuple[str, ...]:
    return ("segment", *(f"stacked {m}" for m in METHODS), *((GRAPHED,) if device == "cuda" else ()))


LayerStep = Callable[[], object]


def _layer_groups(shapes: dict[str, tuple[int, int]]) -> list[tuple[str, tuple[str, ...]]]:
    """The runner's calls in one layer: each FUSED_GROUPS entry the base has together, the rest alone."""
    grouped = [(g, names) for g, names in FUSED_GROUPS.items() if all(n in shapes for n in names)]
    members = {n for _, names in grouped for n in names}
    return grouped + [(n, (n,)) for n in shapes if n not in members]


def _first_layer(key: str, weights: AdapterWeights, device: str, dtype: torch.dtype) -> ResidentAdapter:
    """The adapter's layer 0 only: one layer is what is timed, and the stack holds one layer."""
    layer0 = AdapterWeights(weights.config, {k: v for k, v in weights.modules.items() if k[0] == 0})
    return ResidentAdapter.from_weights(key, layer0, None, device=device, dtype=dtype)


def _steps(
    shapes: dict[str, tuple[int, int]],
    adapters: list[ResidentAdapter],
    batch: int,
    device: str,
    dtype: torch.dtype,
) -> dict[str, LayerStep]:
    """Variant -> a callable that adds one layer's LoRA deltas for ``batch`` tokens, in place (the
    graphed variant replays into its graph's own output; what is timed is the same work)."""
    gen = torch.Generator(device=device).manual_seed(batch)
    groups = _layer_groups(shapes)
    xs = {
        g: torch.randn(batch, shapes[n[0]][0], generator=gen, device=device, dtype=dtype) for g, n in groups
    }
    ys = {
        n: torch.randn(batch, shapes[n][1], generator=gen, device=device, dtype=dtype)
        for _, ns in groups
        for n in ns
    }
    # round-robin over the adapters, then grouped by adapter (the segment path needs it; the stack not)
    choice = sorted(i % len(adapters) for i in range(batch))
    segments = segments_of(choice, [1] * batch)
    by_slot = dict(enumerate(adapters))

    def segment() -> None:
        for group, names in groups:
            if len(names) > 1:
                apply_lora_group({n: ys[n] for n in names}, xs[group], 0, group, segments, by_slot)
            else:
                apply_lora(ys[group], xs[group], 0, group, segments, by_slot)

    steps: dict[str, LayerStep] = {"segment": segment}
    r_max = max(w.a_t.shape[1] for a in adapters for w in a.modules.values())
    for method in METHODS:
        stack = StackedLora(shapes, 1, len(adapters), r_max, device=device, dtype=dtype, method=method)
        row_of = [stack.write(slot, a) for slot, a in enumerate(adapters)]
        rows = torch.tensor([row_of[c] for c in choice], device=device)

        def stacked(rows: torch.Tensor, stack: StackedLora = stack) -> torch.Tensor:
            selected = stack.select(rows)  # once per step in the runner; one layer here, so counted in
            for group, names in groups:
                if len(names) > 1:
                    stack.apply_group({n: ys[n] for n in names}, xs[group], 0, group, selected)
                else:
                    stack.apply(ys[group], xs[group], 0, group, selected)
            return ys[groups[-1][1][-1]]

        steps[f"stacked {method}"] = partial(stacked, rows)
        if method == "masked" and device == "cuda":
            graphs = DecodeGraphs(
                lambda inputs, stacked=stacked: stacked(inputs["rows"]),
                {"rows": StaticInput(torch.long, pad=ZERO_ROW)},
                batch,
                device=device,
                mode="graph",
            )
            steps[GRAPHED] = partial(graphs.run, {"rows": rows})
    return steps


def _time(step: LayerStep, iters: int, device: str) -> float:
    """Mean seconds per call over ``iters`` back-to-back calls (one timed block, as a decode step runs
    them; on a GPU the launches count, which is the point)."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _measure(args: argparse.Namespace, result: SuiteResult, tiny: Path | None) -> None:
    base = load_base(tiny)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    folders = make_adapters(base, mixed_specs(max(args.adapters)), args.adapter_cache)
    config = AutoConfig.from_pretrained(base.path)
    shapes = linear_shapes(config)
    residents = [
        _first_layer(name, load_adapter(folder, config), args.device, dtype)
        for name, folder in folders.items()
    ]
    with torch.inference_mode():
        for n_adapters in args.adapters:
            for batch in args.batches:
                steps = _steps(shapes, residents[:n_adapters], batch, args.device, dtype)
                for step in steps.values():  # warm-up: first calls allocate and pick kernels
                    _time(step, 2, args.device)
                for repeat in range(args.repeats):
                    order = list(steps)
                    order = order[repeat % len(order) :] + order[: repeat % len(order)]
                    for variant in order:
                        seconds = _time(steps[variant], args.iters, args.device)
                        result.rows.append(
                            {
                                "repeat": repeat,
                                "batch": batch,
                                "adapters": n_adapters,
                                "variant": variant,
                                "seconds": seconds,
                            }
                        )
                        print(
                            f"repeat {repeat} batch {batch:>2} adapters {n_adapters:>2} {variant:>14}: "
                            f"{seconds * 1e6:8.1f} us/layer",
                            flush=True,
                        )


def speedups(result: SuiteResult, variant: str, batch: int, adapters: int) -> list[float]:
    """Per repeat, segment time / ``variant`` time (above 1: ``variant`` is faster)."""
    return paired_ratios(result.rows, "segment", variant, key="seconds", batch=batch, adapters=adapters)


def run(args: argparse.Namespace, tiny: Path | None = None) -> SuiteResult:
    """Measure and fill the headline ratios (the largest batch, each adapter count, each method)."""
    config = {
        "batches": args.batches,
        "adapters": args.adapters,
        "iters": args.iters,
        "repeats": args.repeats,
        "adapter_specs": "ranks 8/16/32/64 cycling, all-linear and q/v alternating; layer 0",
        "base": base_label(tiny),
    }
    with measuring("stacked_lora", args, config) as result:
        _measure(args, result, tiny)
    # The default method (and on a GPU its graph) at the largest batch, fewest and most adapters; the
    # gather method and the other cells are in the details table.
    top = max(args.batches)
    shown = [v for v in variants(args.device)[1:] if v != "stacked gather"]
    for n_adapters in sorted({min(args.adapters), max(args.adapters)}):
        for variant in shown:
            result.add_headline(
                f"segment / {variant} time, batch {top}, {n_adapters} adapter(s)",
                median(speedups(result, variant, top, n_adapters)),
                "x",
            )
    return result


def details(result: SuiteResult) -> str:
    rows = []
    for n_adapters in result.config["adapters"]:
        for batch in result.config["batches"]:
            line: list[object] = [batch, n_adapters]
            for variant in variants(result.machine.device):
                times = [
                    r["seconds"]
                    for r in result.rows
                    if r["variant"] == variant and r["batch"] == batch and r["adapters"] == n_adapters
                ]
                line.append(median(times) * 1e6)
            line += [
                median(speedups(result, v, batch, n_adapters)) for v in variants(result.machine.device)[1:]
            ]
            rows.append(line)
    columns = [
        "batch",
        "adapters",
        *(f"{v} us/layer" for v in variants(result.machine.device)),
        *(f"segment / {v}" for v in variants(result.machine.device)[1:]),
    ]
    return (
        "Median time of one layer's LoRA deltas (every targetable linear) and median paired ratios:\n\n"
        + markdown_table(columns, rows)
        + "\n\n![stacked vs segment](stacked_lora.png)"
    )


def _plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adapters = result.config["adapters"]
    fig, axes = plt.subplots(1, len(adapters), figsize=(4 * len(adapters), 3.6), squeeze=False)
    for ax, n_adapters in zip(axes[0], adapters, strict=True):
        for variant in variants(result.machine.device):
            values = [
                median(
                    [
                        r["seconds"] * 1e6
                        for r in result.rows
                        if r["variant"] == variant and r["batch"] == b and r["adapters"] == n_adapters
                    ]
                )
                for b in result.config["batches"]
            ]
            ax.plot(result.config["batches"], values, marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{n_adapters} adapter(s)")
        ax.set_xlabel("tokens in the batch")
    axes[0][0].set_ylabel("us per layer (median)")
    axes[0][0].legend()
    save_figure(fig, folder / "stacked_lora.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the --quick defaults filled in."""
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--adapters", type=int, nargs="+", default=None)
    parser.add_argument("--iters", type=int, default=None, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    args.batches = args.batches or ([1, 64] if args.quick else [1, 16, 64])
    args.adapters = args.adapters or ([1, 16] if args.quick else [1, 4, 16])
    args.iters = args.iters or (10 if args.quick else 50)
    args.repeats = args.repeats or (2 if args.quick else 5)
    return args


if __name__ == "__main__":
    suite_main(parse_args, run, details, _plot)
