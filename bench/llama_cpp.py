"""llama_cpp: our server vs llama.cpp's server (llama-cpp-python) on the same model, same HTTP load.

Both servers run on 127.0.0.1 with the same CPU thread count: ``python -m lorayard.server`` (the embedded
SmolLM2-135M-Instruct, float32 safetensors dequantized from the package's GGUF) and
``python -m llama_cpp.server`` on that very GGUF (Q4_1). Our load tester drives both with the same
streamed requests (completions endpoint, the load tester's default prompts, greedy, ``--max-tokens``
tokens each: ``ignore_eos`` on ours, ``min_tokens`` on llama.cpp, which has no ``ignore_eos``) in a
closed loop at each concurrency; the two servers alternate order per repeat and concurrency. Headlines
are medians of per-repeat ratios ours / llama.cpp: output tokens/s (> 1: ours faster) and TTFT p50
(< 1: ours faster).

Precision is not the same on both sides: llama.cpp computes with the GGUF's Q4_1 weights (activations
quantized to Q8_1 for the dot products, Q8_0 token embedding and output head, f16 KV cache) and reads
~6x fewer weight bytes per step; ours computes in float32 throughout (the same Q4_1 values dequantized).
llama-cpp-python's server runs one request at a time (a lock around the model; queued requests wait)
and applies a LoRA only at load (``--lora_path``, one adapter for every request); it cannot pick an
adapter per request. So the LoRA variant compares our server naming one random adapter (rank 8,
all-linear) per request with llama.cpp loaded with that adapter converted to GGUF (f32) by llama.cpp's
``convert_lora_to_gguf.py``; it runs only when ``--llama-cpp-src`` names a llama.cpp source tree.
llama.cpp streams no usage, so its output tokens are ``--max-tokens`` for each request that finished by
length (every one does when EOS is masked), else its streamed text deltas.

Build the peer in its own venv (never the project's; ~5 min on 2 cores) and unpack the same version's
sdist for the converter (its vendored llama.cpp matches the built server):

    python3 -m venv build/llamacpp-venv
    CMAKE_BUILD_PARALLEL_LEVEL=2 build/llamacpp-venv/bin/pip install 'llama-cpp-python[server]==0.3.36'
    build/llamacpp-venv/bin/pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d build
    tar xzf build/llama_cpp_python-0.3.36.tar.gz -C build
    export LLAMA_PYTHON=build/llamacpp-venv/bin/python
    export LLAMA_CPP_SRC=build/llama_cpp_python-0.3.36/vendor/llama.cpp

    python -m bench.llama_cpp --llama-python "$LLAMA_PYTHON" [--llama-cpp-src "$LLAMA_CPP_SRC"] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from lorayard.client.client import LorayardClient
from lorayard.client.loadtest import DEFAULT_PROMPTS, LoadTestConfig, LoadTester

from bench.peer import start_peer, summarize_run
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
from bench.workload import load_base, make_adapters, mixed_specs
from lorayard.base_model import embedded_gguf_path
from lorayard.testing.server import ServerProcess

DEFAULT_LLAMA_PYTHON = Path("/work/llamacpp-venv/bin/python")
OURS, LLAMA = "ours", "llama.cpp"
SERVERS = (OURS, LLAMA)
BASE, LORA = "base", "1 LoRA"
CONVERTER = "convert_lora_to_gguf.py"
MIN_REQUESTS_PER_RUN = 8
"""Requests per run at least (2 x concurrency above 4), so a run at concurrency 1 has a p50 worth taking."""
PER_REQUEST_LORA_NOTE = (
    "llama-cpp-python's server has no per-request adapter: a LoRA is applied at load (`--lora_path`) "
    "to every request (the C++ llama-server has a per-request `lora` field, ggml-org/llama.cpp#10994, "
    "which llama-cpp-python does not expose)"
)
BUILD_HINT = (
    "build llama-cpp-python's server in a separate venv (~5 min):\n"
    "  python3 -m venv /work/llamacpp-venv\n"
    "  CMAKE_BUILD_PARALLEL_LEVEL=2 /work/llamacpp-venv/bin/pip install 'llama-cpp-python[server]==0.3.36'\n"
    "then pass --llama-python /work/llamacpp-venv/bin/python (make bench LLAMA_PYTHON=...)"
)


# -- pure bookkeeping (unit-tested) ----------------------------------------------------------------
def ours_over_llama(rows: list[dict[str, Any]], variant: str, concurrency: int, key: str) -> list[float]:
    """Per repeat: ours[key] / llama.cpp[key] for one variant and concurrency (pairs with both sides)."""
    return paired_ratios(rows, OURS, LLAMA, key=key, by="server", variant=variant, concurrency=concurrency)


def requests_for(concurrency: int) -> int:
    """Requests per run: two rounds of the closed loop, at least MIN_REQUESTS_PER_RUN."""
    return max(MIN_REQUESTS_PER_RUN, 2 * concurrency)


def server_order(repeat: int, index: int) -> tuple[str, str]:
    """Which server runs first: alternates per repeat and per concurrency, so neither always leads."""
    return SERVERS if (repeat + index) % 2 == 0 else SERVERS[::-1]


# -- processes --------------------------------------------------------------------------------------
def _check_llama_python(path: Path) -> None:
    """Exit 2 with build instructions if ``path`` cannot run llama_cpp.server."""
    problem = None
    if not path.is_file():
        problem = f"--llama-python {path}: no such interpreter"
    else:
        probe = subprocess.run([str(path), "-c", "import llama_cpp.server"], capture_output=True, text=True)
        if probe.returncode != 0:
            problem = f"--llama-python {path} cannot import llama_cpp.server: {probe.stderr.strip()[-300:]}"
    if problem:
        print(f"{problem}\n{BUILD_HINT}", file=sys.stderr)
        raise SystemExit(2)


def _llama_version(path: Path) -> str:
    out = subprocess.run(
        [str(path), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def _convert_lora(src: Path, adapter: Path, base_dir: Path, out: Path) -> None:
    """PEFT folder -> LoRA GGUF (f32) with llama.cpp's own converter, run from its source tree."""
    argv = [sys.executable, str(src / CONVERTER), "--base", str(base_dir), "--outtype", "f32"]
    subprocess.run(
        [*argv, "--outfile", str(out), str(adapter)],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


# -- load --------------------------------------------------------------------------------------------
class MinTokensTransport(httpx.AsyncBaseTransport):
    """Adds ``min_tokens`` to every JSON request body: llama-cpp-python's way to keep EOS from ending a
    request early (it has no ``ignore_eos``), which the load tester does not send by itself."""

    def __init__(
        self, min_tokens: int, max_connections: int, inner: httpx.AsyncBaseTransport | None = None
    ) -> None:
        """``inner``: where the rewritten requests go (default: the network, ``max_connections`` wide)."""
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._inner = inner or httpx.AsyncHTTPTransport(limits=limits)
        self._min_tokens = min_tokens

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.content:
            body = {**json.loads(request.content), "min_tokens": self._min_tokens}
            headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "content-length"]
            request = httpx.Request(
                request.method, request.url, headers=headers, json=body, extensions=request.extensions
            )
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _load(server: ServerProcess, adapter: str | None, concurrency: int, args: argparse.Namespace, seed: int):
    config = LoadTestConfig(
        base_url=server.v1,
        adapters=[adapter],
        concurrency=concurrency,
        requests=requests_for(concurrency),
        max_duration_s=args.max_run_s,
        max_tokens=args.max_tokens,
        temperature=0.0,
        stream=True,
        ignore_eos=server.name == OURS,
        endpoint="completion",
        seed=seed,
    )
    transport = MinTokensTransport(args.max_tokens, concurrency) if server.name == LLAMA else None
    return asyncio.run(LoadTester(config, transport=transport).run())


def _probe(server: ServerProcess, adapter: str | None, max_tokens: int) -> dict[str, Any]:
    """One non-streamed greedy completion (also the warm-up): what each server read and wrote."""
    extra = {"ignore_eos": True} if server.name == OURS else {"min_tokens": max_tokens}
    with LorayardClient(server.v1, timeout=300) as client:
        result = client.complete(
            DEFAULT_PROMPTS[0], adapter=adapter, max_tokens=max_tokens, temperature=0.0, **extra
        )
    usage = result.usage
    return {
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "finish_reason": result.finish_reason,
        "text": result.text[:80],
    }


@dataclass
class Setup:
    """The servers of one run: variant -> server name -> (server, adapter named per request)."""

    servers: dict[str, dict[str, tuple[ServerProcess, str | None]]]
    started: list[ServerProcess]
    """Every process started so far (stopped at the end, also when a later start failed)."""


def _lora_gguf(args: argparse.Namespace, folder: Path, base_dir: Path, out: Path) -> str | None:
    """Convert the adapter for llama.cpp; returns why the LoRA variant cannot run (None: it can)."""
    if args.llama_cpp_src is None:
        return "not run: no --llama-cpp-src (llama.cpp source with convert_lora_to_gguf.py) given"
    if not (args.llama_cpp_src / CONVERTER).is_file():
        return f"not run: {args.llama_cpp_src / CONVERTER} does not exist"
    try:
        _convert_lora(args.llama_cpp_src, folder, base_dir, out)
    except subprocess.CalledProcessError as exc:
        return f"not run: {CONVERTER} failed: {exc.stderr.decode(errors='replace')[-300:]}"
    return None


def _start_servers(args: argparse.Namespace, work: Path, result: SuiteResult, setup: Setup) -> None:
    base = load_base()
    gguf = embedded_gguf_path()
    folders = make_adapters(base, mixed_specs(1), args.adapter_cache)
    name, folder = next(iter(folders.items()))
    volume = work / "adapters"
    shutil.copytree(folder, volume / name)  # a plain PEFT folder on the volume, named per request
    lora_gguf = work / f"{name}-f32.gguf"
    lora_reason = _lora_gguf(args, folder, base.path, lora_gguf)
    result.config.update(
        {
            "gguf": gguf.name,
            "llama_cpp_python": _llama_version(args.llama_python),
            "lora": {"adapter": name, "ran": lora_reason is None, "reason": lora_reason},
        }
    )
    llama = [str(args.llama_python), "-m", "llama_cpp.server", "--model", str(gguf)]
    llama += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    # interrupt_requests (default on) would cut a running stream short whenever another request waits.
    llama += ["--n_ctx", "2048", "--interrupt_requests", "False"]
    ours = [sys.executable, "-m", "lorayard.server", "--adapters-dir", str(volume), "--device", "cpu"]
    ours += ["--max-batch-size", str(max(args.concurrency)), "--log-level", "warning"]
    starts = [(BASE, OURS, ours, "/ready", None), (BASE, LLAMA, llama, "/v1/models", None)]
    if lora_reason is None:
        starts.append((LORA, LLAMA, [*llama, "--lora_path", str(lora_gguf)], "/v1/models", None))
    for variant, server_name, argv, ready, adapter in starts:
        log = work / f"{server_name}-{variant.replace(' ', '')}.log"
        server = start_peer(argv, args.threads, ready, log)
        setup.started.append(server)
        setup.servers.setdefault(variant, {})[server_name] = (server, adapter)
    if lora_reason is None:
        setup.servers[LORA][OURS] = (setup.servers[BASE][OURS][0], name)


def _measure(args: argparse.Namespace, result: SuiteResult) -> None:
    setup = Setup({}, [])
    with tempfile.TemporaryDirectory(prefix="lorayard-llama-cpp-") as tmp:
        try:
            _start_servers(args, Path(tmp), result, setup)
            result.config["probes"] = [
                {"variant": v, "server": n, **_probe(s, a, args.max_tokens)}
                for v, by_server in setup.servers.items()
                for n, (s, a) in by_server.items()
            ]
            for repeat in range(args.repeats):
                for index, concurrency in enumerate(args.concurrency):
                    for variant, by_server in setup.servers.items():
                        for name in server_order(repeat, index):
                            server, adapter = by_server[name]
                            run = _load(server, adapter, concurrency, args, seed=repeat)
                            row = summarize_run(run.samples, run.duration_s, args.max_tokens)
                            row.update(repeat=repeat, concurrency=concurrency, variant=variant, server=name)
                            result.rows.append(row)
                            print(
                                f"repeat {repeat} c={concurrency:>2} {variant:>6} {name:>9}: "
                                f"{row['tokens_per_s']:6.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:6.0f} ms, "
                                f"{row['completed']}/{row['requests']} ok",
                                flush=True,
                            )
        finally:
            for server in setup.started:
                server.stop()


def add_headlines(result: SuiteResult, concurrency: list[int]) -> None:
    """ours / llama.cpp: tok/s at each concurrency, TTFT p50 at the lowest and highest (LoRA: lowest)."""
    ends = sorted({min(concurrency), max(concurrency)})
    for variant in _variants(result):
        label = "" if variant == BASE else f", {variant}"
        for c in concurrency:
            result.add_headline(
                f"ours / llama.cpp output tok/s, concurrency {c}{label}",
                median(ours_over_llama(result.rows, variant, c, "tokens_per_s")),
                "x",
            )
        for c in ends if variant == BASE else ends[:1]:
            result.add_headline(
                f"ours / llama.cpp TTFT p50, concurrency {c}{label}",
                median(ours_over_llama(result.rows, variant, c, "ttft_p50_ms")),
                "x",
                higher_is_better=False,
            )


def run(args: argparse.Namespace) -> SuiteResult:
    """Check the peer, start both servers, measure, fill the headline ratios."""
    if args.device != "cpu":
        raise SystemExit("bench.llama_cpp compares CPU servers (llama-cpp-python is built for the CPU here)")
    _check_llama_python(args.llama_python)
    config = {
        "concurrency": args.concurrency,
        "requests_per_run": {c: requests_for(c) for c in args.concurrency},
        "max_tokens": args.max_tokens,
        "prompts": "lorayard.client.loadtest.DEFAULT_PROMPTS (completions endpoint, raw text)",
        "repeats": args.repeats,
        "threads_per_server": args.threads,
        "precision": {
            OURS: "float32 weights, activations and KV cache (weights dequantized from the Q4_1 GGUF)",
            LLAMA: "GGUF Q4_1 weights (x Q8_1 activations), Q8_0 embedding/output, f16 KV cache",
        },
        "per_request_lora": PER_REQUEST_LORA_NOTE,
    }
    with measuring("llama_cpp", args, config) as result:
        _measure(args, result)
    add_headlines(result, args.concurrency)
    return result


def _median_of(rows: list[dict], variant: str, server: str, concurrency: int, key: str) -> float:
    return median(
        [
            r[key]
            for r in rows
            if r["variant"] == variant and r["server"] == server and r["concurrency"] == concurrency
        ]
    )


def _variants(result: SuiteResult) -> list[str]:
    return [BASE] + ([LORA] if result.config["lora"]["ran"] else [])


def details(result: SuiteResult) -> str:
    rows = []
    for variant in _variants(result):
        for c in result.config["concurrency"]:
            line: list[object] = [variant, c]
            for key in ("tokens_per_s", "ttft_p50_ms", "itl_p50_ms"):
                line += [_median_of(result.rows, variant, s, c, key) for s in SERVERS]
                line.append(median(ours_over_llama(result.rows, variant, c, key)))
            rows.append(line)
    columns = ["variant", "concurrency"]
    for what in ("tok/s", "TTFT p50 ms", "ITL p50 ms"):
        columns += [f"ours {what}", f"llama.cpp {what}", "ours/llama.cpp"]
    probes = [
        [
            p["variant"],
            p["server"],
            p["prompt_tokens"],
            p["completion_tokens"],
            p["finish_reason"],
            "`" + p["text"][:48].replace("\n", " ").replace("|", "/").replace("`", "'") + "`",
        ]
        for p in result.config.get("probes", [])
    ]
    counted = sorted({how for r in result.rows for how in r["tokens_counted_by"]})
    short = sum(r["completed"] - r["finished_by_length"] for r in result.rows)
    errors = sum(r["errors"] for r in result.rows)
    lora = result.config["lora"]
    lora_line = (
        f"LoRA variant: ours names adapter `{lora['adapter']}` per request; llama.cpp was started with it "
        f"converted to GGUF (`--lora_path`). {result.config['per_request_lora']}."
        if lora["ran"]
        else f"LoRA variant {lora['reason']}. {result.config['per_request_lora']}."
    )
    precision = result.config["precision"]
    return (
        "Medians over repeats; ratios are medians of per-repeat ours / llama.cpp "
        "(tok/s: > 1 ours faster; latencies: < 1 ours faster):\n\n"
        + markdown_table(columns, rows)
        + f"\n\nPrecision: ours {precision[OURS]}; llama.cpp {precision[LLAMA]} "
        f"(llama-cpp-python {result.config['llama_cpp_python']}, `{result.config['gguf']}`).\n\n"
        + lora_line
        + f"\n\nTokens counted by: {', '.join(counted)}; requests that stopped before --max-tokens: "
        f"{short}; failed requests: {errors}.\n\n"
        "One greedy non-streamed probe per server (also the warm-up; same prompt on both):\n\n"
        + markdown_table(["variant", "server", "prompt tok", "completion tok", "finish", "text"], probes)
        + "\n\n![llama_cpp](llama_cpp.png)"
    )


def _plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrencies = result.config["concurrency"]
    series = [(v, s) for v in _variants(result) for s in SERVERS]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(series)
    for ax, key, label in (
        (axes[0], "tokens_per_s", "output tokens/s (median)"),
        (axes[1], "ttft_p50_ms", "TTFT p50, ms (median)"),
    ):
        for i, (variant, server) in enumerate(series):
            values = [_median_of(result.rows, variant, server, c, key) for c in concurrencies]
            hatch = "//" if variant == LORA else None
            color = "tab:blue" if server == OURS else "tab:orange"
            ax.bar(
                [j + i * width for j in range(len(concurrencies))],
                values,
                width,
                label=f"{server} ({variant})",
                color=color,
                hatch=hatch,
                edgecolor="white",
            )
        ticks = [j + 0.4 - width / 2 for j in range(len(concurrencies))]
        ax.set_xticks(ticks, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=8, loc="upper left")  # short TTFT bars at the lowest concurrency
    fig.suptitle(f"ours (float32) vs llama.cpp ({result.config['gguf']}), {result.machine.threads} thread(s)")
    save_figure(fig, folder / "llama_cpp.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the --quick defaults filled in."""
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--llama-python",
        type=Path,
        default=DEFAULT_LLAMA_PYTHON,
        help="interpreter of a venv with llama-cpp-python[server]",
    )
    parser.add_argument(
        "--llama-cpp-src",
        type=Path,
        default=None,
        help=f"llama.cpp source tree with {CONVERTER} (enables the LoRA variant)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-run-s", type=float, default=600, help="hard cap of one load run")
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or ([1, 4] if args.quick else [1, 4, 16])
    args.max_tokens = args.max_tokens or (32 if args.quick else 64)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


if __name__ == "__main__":
    suite_main(parse_args, run, details, _plot)
