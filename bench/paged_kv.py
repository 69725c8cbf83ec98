"""paged_kv: the paged KV cache (prefix caching, batched prefill) against another commit's engine.

Two engines, each in its own worker process on the same base and the same random adapters:
``current`` (this tree) and ``baseline`` (the engine at ``--baseline-ref``, exported with ``git
archive``; the workload code is this tree's for both); without ``--baseline-ref``, the current engine
alone. The committed results compare with the slot cache (304e28a), measured at 50ebc7b, the last
commit before the ``lorayard`` namespace: a baseline must have ``lorayard/server/``, so rerun that
comparison from a checkout of 50ebc7b. The
parent sends each worker one command at a time (JSON lines over stdin/stdout) and alternates which
goes first per repeat, so the two are interleaved and never run at once. Four figures:

* **shared-prefix TTFT** (current engine only: the slot cache has no prefix cache): one request at
  a time, 1 output token, each prompt a ``--prefix-tokens`` prefix plus ``--suffix-tokens`` fresh
  tokens; the prefix is the same for every ``shared`` request (a system prompt, cached by the
  warm-up) and fresh for every ``unique`` one, the two alternating; headline: median over repeats of
  median shared TTFT / median unique TTFT.
* **capacity**: ``--capacity-requests`` requests of ``--capacity-prompt-tokens`` random tokens and
  ``--capacity-max-tokens`` output tokens submitted at once to an engine with ``--kv-cache-memory-gb``
  at ``--max-model-len`` (``max_batch_size`` = the request count, so only the KV budget limits);
  the figure is the peak of ``engine.stats().running`` polled every 2 ms; headline current / baseline.
* **throughput**: ``bench.multi_adapter``'s workload at ``--concurrency``: its fixed 32-token prompt,
  greedy ``ignore_eos``, ``--max-tokens`` tokens, round-robin over ``--adapters`` mixed adapters;
  headline: median of per-repeat ratios of output tok/s, current / baseline.
* **burst TTFT**: ``--burst`` requests submitted at once to an idle engine, random prompts with
  lengths spread evenly over ``--burst-prompt-tokens MIN MAX``, round-robin over the base and the
  adapters; headline: median of per-repeat ratios of TTFT p50, current / baseline.

Prompts are random token ids from seeded generators, the same in both workers; ``unique`` and burst
prompts are new in every repeat, so no engine can hit a cache the workload did not mean to share.
The throughput, burst and TTFT engines have ``--serve-kv-gb`` (16 slots of 2048 tokens today).

    python -m bench.paged_kv [--device cpu|cuda] [--quick] [--baseline-ref REF]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import IO, Any

from bench.record import (
    REPO,
    SuiteResult,
    common_arguments,
    markdown_table,
    measuring,
    median,
    paired_ratios,
    percentile,
    save_figure,
    setup_torch,
    suite_main,
)
from bench.workload import (
    WARMUP_TOKENS,
    AdapterSlot,
    EngineBench,
    RequestTiming,
    base_label,
    bench_prompt,
    load_base,
    make_adapters,
    mixed_specs,
    run_batch,
    run_request,
)
from lorayard.server.settings import Settings

POLL_S = 0.002
FIRST_ORDINARY_ID = 100
"""Random prompts draw ids from here to the vocabulary's end: SmolLM2's special tokens sit below."""
GOAL_SHARED_OVER_UNIQUE_TTFT = 0.3
GOAL_CAPACITY_RATIO = 6.0
GOAL_THROUGHPUT_RATIO = 0.95
GOAL_BURST_TTFT_RATIO = 1.0


# -- worker: one engine tree in a subprocess ---------------------------------------------------


def random_prompt(seed: str, length: int, vocab_size: int) -> list[int]:
    """``length`` token ids from a generator seeded by ``seed``: the same list in every process."""
    rng = random.Random(seed)
    return [rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(length)]


class EngineWorker:
    """The worker side: builds engines from settings and runs one workload per command."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = load_base(args.base)
        self.bench: EngineBench | None = None
        self.handles: list[AdapterSlot] = []

    def build(self, settings: dict[str, Any], adapters: dict[str, str]) -> dict[str, Any]:
        """Stop the engine built before, if any, and build and start one with ``settings``."""
        import lorayard.server

        tree = Path(lorayard.server.__file__).resolve().parents[2]
        if not tree.is_relative_to(Path.cwd().resolve()):
            raise RuntimeError(f"server was imported from {tree}, not from the worker's tree {Path.cwd()}")
        self.stop()
        self.bench = EngineBench(self.base, self.args.device, **settings)
        self.bench.load({name: Path(folder) for name, folder in adapters.items()})
        self.bench.engine.start()
        self.handles = [self.bench.handles[name] for name in adapters]
        prefix_caching = Settings.model_fields.get("prefix_caching")
        return {
            "tree": str(tree),
            "prefix_caching": None if prefix_caching is None else prefix_caching.default,
        }

    @property
    def engine(self) -> Any:
        if self.bench is None:
            raise RuntimeError("no engine: send build first")
        return self.bench.engine

    @property
    def vocab_size(self) -> int:
        return int(self.engine.hf_config.vocab_size)

    async def ttft(self, repeat: int, pairs: int, prefix_tokens: int, suffix_tokens: int) -> dict[str, Any]:
        """Alternating shared-prefix and unique-prefix requests, one at a time; TTFT of each."""
        shared = random_prompt("shared-prefix", prefix_tokens, self.vocab_size)
        out: dict[str, list[float]] = {"shared": [], "unique": []}
        for i in range(pairs):
            order = ["shared", "unique"] if i % 2 == 0 else ["unique", "shared"]
            for variant in order:
                prefix = (
                    shared
                    if variant == "shared"
                    else random_prompt(f"unique-{repeat}-{i}", prefix_tokens, self.vocab_size)
                )
                suffix = random_prompt(f"suffix-{variant}-{repeat}-{i}", suffix_tokens, self.vocab_size)
                timing = await run_request(self.engine, prefix + suffix, 1, None)
                out[variant].append(timing.ttft)
        return out

    async def capacity(
        self, repeat: int, requests: int, prompt_tokens: int, max_tokens: int
    ) -> dict[str, Any]:
        """All requests at once; the peak of ``engine.stats().running`` while they run."""
        prompts = [
            random_prompt(f"capacity-{repeat}-{i}", prompt_tokens, self.vocab_size) for i in range(requests)
        ]
        start = time.perf_counter()
        peak, timings = await self._peak_running(self._gather(prompts, max_tokens, [None]))
        elapsed = time.perf_counter() - start
        return {
            "peak_running": peak,
            "elapsed_s": elapsed,
            "tokens_per_s": sum(t.tokens for t in timings) / elapsed,
        }

    async def throughput(self, concurrency: int, max_tokens: int, prompt_tokens: int) -> dict[str, Any]:
        """bench.multi_adapter's batch: one fixed prompt, adapters round-robin; output tok/s."""
        prompt = bench_prompt(self.base, prompt_tokens)
        handles = [self.handles[i % len(self.handles)] for i in range(concurrency)]
        tps, _ = await run_batch(self.engine, prompt, max_tokens, handles)
        return {"tokens_per_s": tps}

    async def burst(self, repeat: int, requests: int, lengths: list[int], max_tokens: int) -> dict[str, Any]:
        """Newcomers submitted at once to an idle engine; TTFT of each."""
        step = (lengths[1] - lengths[0]) / max(1, requests - 1)
        prompts = [
            random_prompt(f"burst-{repeat}-{i}", round(lengths[0] + i * step), self.vocab_size)
            for i in range(requests)
        ]
        timings = await self._gather(prompts, max_tokens, [None, *self.handles])
        return {"ttft_s": [t.ttft for t in timings]}

    async def _gather(
        self, prompts: list[list[int]], max_tokens: int, pool: list[AdapterSlot | None]
    ) -> list[RequestTiming]:
        return list(
            await asyncio.gather(
                *(run_request(self.engine, p, max_tokens, pool[i % len(pool)]) for i, p in enumerate(prompts))
            )
        )

    async def _peak_running(
        self, work: Coroutine[Any, Any, list[RequestTiming]]
    ) -> tuple[int, list[RequestTiming]]:
        task = asyncio.ensure_future(work)
        peak = 0
        while not task.done():
            peak = max(peak, self.engine.stats().running)
            await asyncio.wait({task}, timeout=POLL_S)
        return peak, task.result()

    def stop(self) -> dict[str, Any]:
        if self.bench is not None:
            self.bench.stop()
            self.bench = None
        return {}

    def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command.pop("op")
        if op == "build":
            return self.build(**command)
        if op == "stop":
            return self.stop()
        if op in ("ttft", "capacity", "throughput", "burst"):
            return asyncio.run(getattr(self, op)(**command))
        raise ValueError(f"unknown command {op!r}")


def worker_main(args: argparse.Namespace) -> None:
    """Serve commands from stdin until it closes; replies are JSON lines on the original stdout."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, never into the protocol
    setup_torch(args)
    worker = EngineWorker(args)
    try:
        for line in sys.stdin:
            try:
                reply = worker.handle(json.loads(line))
            except Exception as exc:  # reported to the parent, which fails the run with it
                traceback.print_exc()
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            protocol.write(json.dumps(reply) + "\n")
    finally:
        worker.stop()


# -- parent: two workers, alternated ------------------------------------------------------------


class WorkerFailed(RuntimeError):
    """A worker process reported an error or exited."""


class WorkerProcess:
    """The parent's handle on one worker: ``python -m bench.paged_kv --worker`` in the engine's tree."""

    def __init__(self, name: str, tree: Path, args: argparse.Namespace, base: Path | None) -> None:
        self.name = name
        # cwd and PYTHONPATH's first entry are the engine's tree (lorayard/); bench/ and the client
        # come from this tree, which an exported baseline tree does not contain.
        path = list(dict.fromkeys([str(tree), str(REPO)]))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": str(args.threads)}
        command = [sys.executable, "-m", "bench.paged_kv", "--worker", "--device", args.device]
        command += ["--threads", str(args.threads)] + (["--base", str(base)] if base else [])
        self.process = subprocess.Popen(
            command, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        stdin, stdout = self._pipes()
        try:
            stdin.write(json.dumps({"op": op, **fields}) + "\n")
            stdin.flush()
        except BrokenPipeError:
            pass  # it exited; the empty read below says so
        line = stdout.readline()
        if not line:
            raise WorkerFailed(
                f"the {self.name} worker exited (code {self.process.wait()}); its output is above"
            )
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise WorkerFailed(f"the {self.name} worker failed at {op!r}: {reply['error']}")
        return reply

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self.process.stdin is not None and self.process.stdout is not None
        return self.process.stdin, self.process.stdout

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """After a normal run, close its stdin (it stops its engine and exits); after a failure or
        SIGTERM, terminate it at once rather than wait for a command in flight."""
        stdin, _ = self._pipes()
        with contextlib.suppress(OSError):
            stdin.close()
        if exc_type is not None:
            self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def export_tree(ref: str, out: Path) -> Path:
    """The engine's package (lorayard/) at ``ref`` in ``out``, via ``git archive``."""
    check = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise SystemExit(
            f"--baseline-ref {ref}: not a commit of this repository (a shallow clone? fetch it, or leave "
            "--baseline-ref out to measure only this tree)"
        )
    layout = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{ref}:lorayard/server"], check=False)
    if layout.returncode != 0:
        raise SystemExit(
            f"--baseline-ref {ref}: predates the lorayard namespace (no lorayard/server/); run this "
            "suite from a checkout of that commit's own tree instead"
        )
    out.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref, "lorayard"], stdout=subprocess.PIPE
    )
    subprocess.run(["tar", "-x", "-C", str(out)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"--baseline-ref {ref}: git archive failed")
    return out


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit, so the finally blocks stop the workers and remove the temp tree."""

    def raise_exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def rotated(workers: dict[str, WorkerProcess], repeat: int) -> list[tuple[str, WorkerProcess]]:
    """The workers, the first one changing every repeat."""
    items = list(workers.items())
    shift = repeat % len(items)
    return items[shift:] + items[:shift]


def _serve_phase(
    args: argparse.Namespace, result: SuiteResult, workers: dict[str, WorkerProcess], adapters: dict[str, str]
) -> None:
    """TTFT with a shared prefix, then throughput and burst TTFT, on engines with the serving defaults."""
    settings = {
        "max_batch_size": max(args.concurrency, args.burst),
        "max_model_len": args.max_model_len,
        "kv_cache_memory_gb": args.serve_kv_gb,
    }
    ttft = {"pairs": args.pairs, "prefix_tokens": args.prefix_tokens, "suffix_tokens": args.suffix_tokens}
    throughput = {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "prompt_tokens": 32}
    burst = {"requests": args.burst, "lengths": args.burst_prompt_tokens, "max_tokens": args.burst_max_tokens}
    for name, worker in workers.items():
        built = worker.call("build", settings=settings, adapters=adapters)
        result.config["engines"][name] = built
        # Warm-up, untimed: the first runs of each shape (a GPU loads kernels then).
        worker.call("throughput", **{**throughput, "max_tokens": WARMUP_TOKENS})
        worker.call("burst", repeat=-1, **{**burst, "requests": 2, "max_tokens": 1})
    current = workers["current"]
    current.call("ttft", repeat=-1, **{**ttft, "pairs": 1})  # also puts the shared prefix in the cache
    for repeat in range(args.repeats):
        out = current.call("ttft", repeat=repeat, **ttft)
        for variant in ("shared", "unique"):
            row = {"measure": "ttft", "engine": "current", "repeat": repeat, "variant": variant}
            result.rows.append({**row, "ttft_s": median(out[variant]), "samples_s": out[variant]})
        print(
            f"repeat {repeat}  current TTFT shared {median(out['shared']) * 1e3:7.1f} ms, "
            f"unique {median(out['unique']) * 1e3:7.1f} ms",
            flush=True,
        )
    for repeat in range(args.repeats):
        for name, worker in rotated(workers, repeat):
            tps = worker.call("throughput", **throughput)["tokens_per_s"]
            result.rows.append(
                {"measure": "throughput", "engine": name, "repeat": repeat, "tokens_per_s": tps}
            )
            print(f"repeat {repeat} {name:>8} throughput c={args.concurrency}: {tps:7.1f} tok/s", flush=True)
        for name, worker in rotated(workers, repeat):
            ttfts = worker.call("burst", repeat=repeat, **burst)["ttft_s"]
            p50 = median(ttfts)
            result.rows.append(
                {"measure": "burst", "engine": name, "repeat": repeat, "ttft_p50_s": p50, "ttft_s": ttfts}
            )
            print(
                f"repeat {repeat} {name:>8} burst of {args.burst}: TTFT p50 {p50 * 1e3:7.1f} ms", flush=True
            )
    for worker in workers.values():
        worker.call("stop")


def _capacity_phase(
    args: argparse.Namespace, result: SuiteResult, workers: dict[str, WorkerProcess], adapters: dict[str, str]
) -> None:
    """Requests running at once in a fixed KV budget."""
    settings = {
        "max_batch_size": args.capacity_requests,
        "max_model_len": args.max_model_len,
        "kv_cache_memory_gb": args.kv_cache_memory_gb,
    }
    workload = {
        "requests": args.capacity_requests,
        "prompt_tokens": args.capacity_prompt_tokens,
        "max_tokens": args.capacity_max_tokens,
    }
    for worker in workers.values():
        worker.call("build", settings=settings, adapters=adapters)
    for repeat in range(args.capacity_repeats):
        for name, worker in rotated(workers, repeat):
            out = worker.call("capacity", repeat=repeat, **workload)
            result.rows.append({"measure": "capacity", "engine": name, "repeat": repeat, **out})
            print(
                f"repeat {repeat} {name:>8} capacity: {out['peak_running']} running at once, "
                f"{out['tokens_per_s']:.1f} tok/s",
                flush=True,
            )
    for worker in workers.values():
        worker.call("stop")


def run(args: argparse.Namespace, tiny: Path | None = None) -> SuiteResult:
    """Measure in two workers (one without --baseline-ref), then fill the headline figures."""
    config: dict[str, Any] = {
        "baseline_ref": args.baseline_ref,
        "max_model_len": args.max_model_len,
        "ttft": {
            "prefix_tokens": args.prefix_tokens,
            "suffix_tokens": args.suffix_tokens,
            "pairs": args.pairs,
        },
        "capacity": {
            "kv_cache_memory_gb": args.kv_cache_memory_gb,
            "requests": args.capacity_requests,
            "prompt_tokens": args.capacity_prompt_tokens,
            "max_tokens": args.capacity_max_tokens,
            "repeats": args.capacity_repeats,
        },
        "throughput": {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "prompt_tokens": 32},
        "burst": {
            "requests": args.burst,
            "prompt_tokens": args.burst_prompt_tokens,
            "max_tokens": args.burst_max_tokens,
        },
        "serve_kv_gb": args.serve_kv_gb,
        "adapters": args.adapters,
        "repeats": args.repeats,
        "base": base_label(tiny),
        "engines": {},
    }
    with (
        measuring("paged_kv", args, config) as result,
        sigterm_unwinds(),
        tempfile.TemporaryDirectory(prefix="paged-kv-") as scratch,
        contextlib.ExitStack() as workers_open,
    ):
        folders = make_adapters(load_base(tiny), mixed_specs(args.adapters), args.adapter_cache)
        adapters = {name: str(folder) for name, folder in folders.items()}
        trees = {"current": REPO}
        if args.baseline_ref is not None:
            trees["baseline"] = export_tree(args.baseline_ref, Path(scratch) / "baseline")
        workers = {
            name: workers_open.enter_context(WorkerProcess(name, tree, args, tiny))
            for name, tree in trees.items()
        }
        _serve_phase(args, result, workers, adapters)
        _capacity_phase(args, result, workers, adapters)
    _add_headlines(result, args)
    return result


def _add_headlines(result: SuiteResult, args: argparse.Namespace) -> None:
    rows = result.rows
    result.add_headline(
        f"TTFT, shared {args.prefix_tokens}-token prefix / unique prefix (current engine)",
        median(paired_ratios(rows, "shared", "unique", key="ttft_s", measure="ttft", engine="current")),
        "x",
        GOAL_SHARED_OVER_UNIQUE_TTFT,
        higher_is_better=False,
    )
    budget = f"{args.kv_cache_memory_gb:g} GB KV at max-model-len {args.max_model_len}"
    for engine in result.config["engines"]:
        peaks = [r["peak_running"] for r in rows if r["measure"] == "capacity" and r["engine"] == engine]
        result.add_headline(f"requests running at once in {budget} ({engine} engine)", median(peaks), "")
    if "baseline" not in result.config["engines"]:
        return
    ratio: dict[str, Any] = {"numerator": "current", "denominator": "baseline", "by": "engine"}
    result.add_headline(
        f"requests running at once in {budget}, current / baseline",
        median(paired_ratios(rows, key="peak_running", measure="capacity", **ratio)),
        "x",
        GOAL_CAPACITY_RATIO,
    )
    result.add_headline(
        f"output tok/s at concurrency {args.concurrency}, {args.adapters} mixed adapters, current / baseline",
        median(paired_ratios(rows, key="tokens_per_s", measure="throughput", **ratio)),
        "x",
        GOAL_THROUGHPUT_RATIO,
    )
    low, high = args.burst_prompt_tokens
    result.add_headline(
        f"TTFT p50, burst of {args.burst} newcomers ({low}-{high} tokens), current / baseline",
        median(paired_ratios(rows, key="ttft_p50_s", measure="burst", **ratio)),
        "x",
        GOAL_BURST_TTFT_RATIO,
        higher_is_better=False,
    )


def _median_of(rows: list[dict[str, Any]], key: str, **where: Any) -> float:
    """NaN where nothing matches (the baseline's TTFT): a bar that is not drawn."""
    return median([r[key] for r in rows if all(r.get(k) == v for k, v in where.items())])


def _cell(value: float, scale: float = 1) -> float | str:
    return "" if math.isnan(value) else value * scale


def _prefix_caching_text(default: bool | None) -> str:
    return "setting absent (the slot cache)" if default is None else f"default {default}"


def details(result: SuiteResult) -> str:
    engines = list(result.config["engines"])
    rows = result.rows
    table = []
    for engine in engines:
        burst = [x for r in rows if r["measure"] == "burst" and r["engine"] == engine for x in r["ttft_s"]]
        table.append(
            [
                engine,
                _cell(_median_of(rows, "ttft_s", measure="ttft", engine=engine, variant="shared"), 1e3),
                _cell(_median_of(rows, "ttft_s", measure="ttft", engine=engine, variant="unique"), 1e3),
                _median_of(rows, "peak_running", measure="capacity", engine=engine),
                _median_of(rows, "tokens_per_s", measure="capacity", engine=engine),
                _median_of(rows, "tokens_per_s", measure="throughput", engine=engine),
                percentile(burst, 50) * 1e3,
                percentile(burst, 99) * 1e3,
            ]
        )
    columns = [
        "engine",
        "TTFT shared ms",
        "TTFT unique ms",
        "running at once",
        "capacity tok/s",
        "throughput tok/s",
        "burst TTFT p50 ms",
        "burst TTFT p99 ms",
    ]
    trees = "; ".join(
        f"{name}: prefix_caching {_prefix_caching_text(e['prefix_caching'])}"
        for name, e in result.config["engines"].items()
    )
    return (
        "Medians over repeats (burst percentiles over every request of every repeat):\n\n"
        + markdown_table(columns, table)
        + f"\n\nEngines: {trees}; baseline ref {result.config['baseline_ref']}.\n\n![paged_kv](paged_kv.png)"
    )


def _plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(result.config["engines"])
    rows = result.rows
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
    ttft = [_median_of(rows, "ttft_s", measure="ttft", variant=v) * 1e3 for v in ("shared", "unique")]
    axes[0].bar(["shared", "unique"], ttft, color=["tab:green", "tab:orange"])
    axes[0].set_title("TTFT by prefix, current engine (ms)", fontsize=9)
    concurrency = result.config["throughput"]["concurrency"]
    panels = [
        ("requests running at once", "peak_running", "capacity", 1),
        (f"output tok/s, concurrency {concurrency}", "tokens_per_s", "throughput", 1),
        ("burst TTFT p50 (ms)", "ttft_p50_s", "burst", 1e3),
    ]
    for ax, (title, key, measure, scale) in zip(axes[1:], panels, strict=True):
        values = [_median_of(rows, key, engine=e, measure=measure) * scale for e in engines]
        ax.bar(engines, values, color=["tab:blue", "tab:gray"][: len(engines)])
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.tick_params(labelsize=8)
    fig.suptitle("Paged KV engine (current) vs slot cache (baseline), medians")
    save_figure(fig, folder / "paged_kv.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the --quick defaults filled in."""
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default=None, help="the engine to compare against (a commit)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--prefix-tokens", type=int, default=700)
    parser.add_argument("--suffix-tokens", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=None, help="shared/unique pairs per repeat")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=0.25, help="the capacity budget")
    parser.add_argument("--capacity-requests", type=int, default=None)
    parser.add_argument("--capacity-prompt-tokens", type=int, default=None)
    parser.add_argument("--capacity-max-tokens", type=int, default=None)
    parser.add_argument("--capacity-repeats", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=None, help="throughput requests' output tokens")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--burst-prompt-tokens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    parser.add_argument("--burst-max-tokens", type=int, default=8)
    parser.add_argument("--serve-kv-gb", type=float, default=1.5, help="KV budget of the other engines")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # --quick: shorter prompts where only the ratio matters (24 requests of 200 tokens still fit
    # the paged pool at once: 12x the slot cache's two), the 700-token prefix as in the full run.
    args.pairs = args.pairs or (2 if args.quick else 6)
    args.capacity_requests = args.capacity_requests or (24 if args.quick else 64)
    args.capacity_prompt_tokens = args.capacity_prompt_tokens or (200 if args.quick else 300)
    args.capacity_max_tokens = args.capacity_max_tokens or (4 if args.quick else 32)
    args.burst_prompt_tokens = args.burst_prompt_tokens or ([100, 250] if args.quick else [200, 500])
    args.capacity_repeats = args.capacity_repeats or (1 if args.quick else 2)
    args.max_tokens = args.max_tokens or (32 if args.quick else 64)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args)
    else:
        suite_main(parse_args, run, details, _plot)


if __name__ == "__main__":
    main()
