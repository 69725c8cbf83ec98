"""adapter_scale: how the registry behaves with 1 .. 1000 adapters on the volume.

For each volume size N (one volume per N, one engine shared by all): cold-load time of an adapter
that is not resident through ``AdapterRegistry.acquire`` (read, validate, upload; LRU eviction
included once ``max_loaded`` is full), the engine memory and process RSS per resident adapter, and
the latency of the /v1/models listing (``registry.list_models``) and of a volume re-scan
(``registry.refresh``). The N are interleaved round by round.

Every adapter is an r16 all-linear LoRA; the volume holds N folders whose weights are hard links to
one file (1000 distinct 20 MB files would not fit a laptop disk), so reads come from the page cache,
as they do on a warm server.

    python -m bench.adapter_scale [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable
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
from bench.workload import ALL_LINEAR, AdapterSpec, EngineBench, base_label, load_base, make_adapters
from lorayard.server.adapters.registry import AdapterRegistry
from lorayard.server.settings import Settings
from lorayard.testing.server import rss_bytes

GOAL_COLD_LOAD_MS = 100.0


def build_volume(root: Path, template: Path, count: int) -> None:
    """``count`` plain PEFT folders sharing the template's weights (hard links, or copies across devices)."""
    root.mkdir(parents=True)
    for i in range(count):
        folder = root / f"adapter-{i:04d}"
        folder.mkdir()
        shutil.copy(template / "adapter_config.json", folder / "adapter_config.json")
        try:
            os.link(template / "adapter_model.safetensors", folder / "adapter_model.safetensors")
        except OSError:
            shutil.copy(template / "adapter_model.safetensors", folder / "adapter_model.safetensors")


def _timed_ms(call: Callable[[], object], times: int) -> list[float]:
    out = []
    for _ in range(times):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1e3)
    return out


async def _measure(args: argparse.Namespace, result: SuiteResult, tiny: Path | None, scratch: Path) -> None:
    base = load_base(tiny)
    template = make_adapters(base, [AdapterSpec("scale-r16", 16, ALL_LINEAR, 1000)], args.adapter_cache)[
        "scale-r16"
    ]
    bench = EngineBench(base, args.device, 1, 64)
    registries: dict[int, AdapterRegistry] = {}
    for n in args.sizes:
        build_volume(scratch / f"n{n}", template, n)
        registries[n] = AdapterRegistry(
            scratch / f"n{n}",
            bench.engine,
            base_fingerprint="",
            max_loaded=args.max_loaded,
            poll_interval_s=Settings().poll_interval,  # never polls: the suite calls refresh() itself
        )
        await registries[n].refresh()
    try:
        # Warm-up: the first load pays one-off imports and allocator growth.
        lease = await registries[args.sizes[0]].acquire("adapter-0000")
        registries[args.sizes[0]].release(lease)
        for round_ in range(args.loads):
            for n in args.sizes:
                registry = registries[n]
                name = f"adapter-{(round_ + 1) % n:04d}" if n > 1 else "adapter-0000"
                if n == 1:  # the only adapter: unload it so every round is a cold load
                    await registry.unload(name)
                rss_before = rss_bytes()
                start = time.perf_counter()
                lease = await registry.acquire(name)
                load_ms = (time.perf_counter() - start) * 1e3
                registry.release(lease)
                result.rows.append(
                    {
                        "kind": "cold_load",
                        "n": n,
                        "round": round_,
                        "ms": load_ms,
                        "rss_delta": rss_bytes() - rss_before,
                    }
                )
        for n in args.sizes:
            registry = registries[n]
            for ms in _timed_ms(registry.list_models, args.list_calls):
                result.rows.append({"kind": "list_models", "n": n, "ms": ms})
            for _ in range(5):
                start = time.perf_counter()
                await registry.refresh()
                result.rows.append({"kind": "refresh", "n": n, "ms": (time.perf_counter() - start) * 1e3})
        adapters = bench.engine.runner.adapters
        per_adapter = [a.nbytes for a in adapters.values()]
        result.rows.append(
            {"kind": "engine_bytes", "resident": len(per_adapter), "bytes": median(per_adapter)}
        )
    finally:
        bench.stop()


def _values(rows: list[dict], kind: str, n: int) -> list[float]:
    return [r["ms"] for r in rows if r["kind"] == kind and r.get("n") == n]


def run(args: argparse.Namespace, tiny: Path | None = None) -> SuiteResult:
    """Measure and fill the headline figures."""
    config = {
        "sizes": args.sizes,
        "loads_per_size": args.loads,
        "max_loaded": args.max_loaded,
        "adapter": "r16 all-linear",
        "base": base_label(tiny),
    }
    with (
        measuring("adapter_scale", args, config) as result,
        tempfile.TemporaryDirectory(prefix="lorayard-scale-") as scratch,
    ):
        asyncio.run(_measure(args, result, tiny, Path(scratch)))
    small, big = min(args.sizes), max(args.sizes)
    cold_big = _values(result.rows, "cold_load", big)
    result.add_headline(
        f"cold-load p50 with {big} adapters on the volume", median(cold_big), "ms", GOAL_COLD_LOAD_MS, False
    )
    result.add_headline(
        f"cold-load p50, {big} / {small} adapters on the volume",
        median(cold_big) / median(_values(result.rows, "cold_load", small)),
        "x",
    )
    result.add_headline(
        f"/v1/models listing p50, {big} / {small} adapters",
        median(_values(result.rows, "list_models", big)) / median(_values(result.rows, "list_models", small)),
        "x",
    )
    return result


def details(result: SuiteResult) -> str:
    rows = []
    for n in result.config["sizes"]:
        cold = _values(result.rows, "cold_load", n)
        listing = _values(result.rows, "list_models", n)
        refresh = _values(result.rows, "refresh", n)
        rows.append(
            [
                n,
                percentile(cold, 50),
                percentile(cold, 99),
                percentile(listing, 50),
                percentile(listing, 99),
                percentile(refresh, 50),
            ]
        )
    columns = [
        "adapters",
        "cold-load p50 ms",
        "cold-load p99 ms",
        "list p50 ms",
        "list p99 ms",
        "re-scan p50 ms",
    ]
    engine = next(r for r in result.rows if r["kind"] == "engine_bytes")
    rss = [r["rss_delta"] for r in result.rows if r["kind"] == "cold_load" and r["rss_delta"] > 0]
    engine_mib = engine["bytes"] / 2**20
    rss_mib = median(rss) / 2**20 if rss else 0.0
    memory = (
        f"Memory per resident r16 all-linear adapter: {engine_mib:.1f} MiB of engine tensors (median over "
        f"{engine['resident']} resident); process RSS grew by a median {rss_mib:.1f} MiB per load that "
        "grew it (eviction frees the rest)."
    )
    return markdown_table(columns, rows) + "\n\n" + memory + "\n\n![adapter scale](adapter_scale.png)"


def _plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result.config["sizes"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for kind, label in [
        ("cold_load", "cold load (acquire)"),
        ("list_models", "/v1/models listing"),
        ("refresh", "volume re-scan"),
    ]:
        ax.plot(sizes, [median(_values(result.rows, kind, n)) for n in sizes], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("adapters on the volume")
    ax.set_ylabel("ms (median)")
    ax.legend()
    save_figure(fig, folder / "adapter_scale.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the --quick defaults filled in."""
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--loads", type=int, default=None, help="cold loads per volume size")
    parser.add_argument("--max-loaded", type=int, default=8)
    parser.add_argument("--list-calls", type=int, default=200)
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([1, 16, 128] if args.quick else [1, 16, 128, 1000])
    args.loads = args.loads or (10 if args.quick else 30)
    return args


if __name__ == "__main__":
    suite_main(parse_args, run, details, _plot)
