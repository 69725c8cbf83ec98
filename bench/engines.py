"""engines: our server with ``--engine native`` vs the same server with ``--engine vllm``, same workload.

Both sides are LoRAyard: the same API, registry, adapters volume and HTTP load; only what runs the
model differs (ours, or vLLM's engine in-process from ``.venv-vllm``). The workload is vllm_cpu's
(the embedded base, its four PEFT adapters, raw completions, greedy, streamed, ``ignore_eos``), four of
its rows: batch-1 decode, 4 mixed adapters at concurrency 16, the base at 16, and the TTFT of unique
long prompts. The two servers alternate order per repeat and scenario; the headlines are per-repeat
native / vllm ratios. A greedy probe records how many outputs of the two engines are token-identical.

    make install-vllm
    python -m bench.engines [--quick] [--vllm-python .venv-vllm/bin/python]

On the CPU both engines compute in float32; ``--device cuda`` compares them on a GPU (``.venv-vllm``
with ``vllm`` there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.peer import start_peer
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
from bench.vllm_cpu import (
    ADAPTERS,
    Scenario,
    Setup,
    greedy_probe,
    higher_is_better,
    measure_scenario,
    prepare,
    scenarios,
)
from lorayard.testing.server import ServerProcess

NATIVE, VLLM = "native", "vllm"
ENGINES = (NATIVE, VLLM)
SCENARIO_KEYS = ("batch1", "mixed16", "base16", "unique_prompt")
DEFAULT_VLLM_PYTHON = Path(".venv-vllm/bin/python")


def engine_scenarios(quick: bool, long_prompt: int = 700) -> list[Scenario]:
    """vllm_cpu's rows that this suite runs, at its sizes."""
    return [s for s in scenarios(quick, long_prompt) if s.key in SCENARIO_KEYS]


def engine_order(repeat: int, index: int) -> tuple[str, str]:
    """Which engine runs first: alternates per repeat and per scenario, so neither always leads."""
    return ENGINES if (repeat + index) % 2 == 0 else ENGINES[::-1]


def native_over_vllm(rows: list[dict[str, Any]], scenario: str, metric: str) -> list[float]:
    """Per repeat: native / vllm for one scenario (pairs with both sides)."""
    return paired_ratios(rows, NATIVE, VLLM, key=metric, by="engine", scenario=scenario)


def server_argv(python: str, engine: str, volume: Path, args: argparse.Namespace) -> list[str]:
    """``lorayard serve`` with one engine; the rest of the flags equal on both sides."""
    argv = [python, "-m", "lorayard.server", "--engine", engine, "--adapters-dir", str(volume)]
    argv += ["--device", args.device, "--max-batch-size", "64", "--max-loaded-adapters", "4"]
    argv += ["--log-level", "warning"]
    if engine == VLLM:
        argv += ["--max-lora-rank", str(max(spec.rank for spec in ADAPTERS))]
        argv += ["--kv-cache-memory-gb", str(args.vllm_kv_gib)]
    return argv


def _start(engine: str, setup: Setup, args: argparse.Namespace) -> ServerProcess:
    # absolute: the peer runs in a folder of its own, where a relative .venv-vllm/bin/python is not
    python = sys.executable if engine == NATIVE else str(args.vllm_python.absolute())
    return start_peer(
        server_argv(python, engine, setup.volume, args),
        args.threads,
        "/ready",
        setup.work / f"{engine}.log",
        timeout=900,
    )


def _measure(args: argparse.Namespace, result: SuiteResult) -> None:
    with tempfile.TemporaryDirectory(prefix="lorayard-engines-") as tmp:
        setup = prepare(args, Path(tmp))
        servers: dict[str, ServerProcess] = {}
        try:
            # one at a time: the slower start (vLLM's) is not measured, only what it then serves
            for engine in ENGINES:
                servers[engine] = _start(engine, setup, args)
            result.config["greedy_probe"] = greedy_probe(servers, 16)
            for repeat in range(args.repeats):
                for index, scenario in enumerate(args.scenarios):
                    for engine in engine_order(repeat, index):
                        row = measure_scenario(
                            servers[engine], scenario, setup.work, repeat, args, setup.tokenizer
                        )
                        row.update(repeat=repeat, scenario=scenario.key, engine=engine)
                        result.rows.append(row)
                        print(
                            f"repeat {repeat} {scenario.key:>13} {engine:>6}: "
                            f"{row['tokens_per_s']:7.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:7.0f} ms, "
                            f"{row['completed']}/{row['requests']} ok",
                            flush=True,
                        )
        finally:
            for server in servers.values():
                server.stop()


def add_headlines(result: SuiteResult, rows: list[Scenario]) -> None:
    """native / vllm per scenario: goal 1 (native at least vLLM's tok/s, at most its TTFT)."""
    for scenario in rows:
        ratios = native_over_vllm(result.rows, scenario.key, scenario.metric)
        better = higher_is_better(scenario.metric)
        result.add_headline(f"native / vllm engine: {scenario.label}", median(ratios), "x", 1.0, better)


def _check_vllm_python(path: Path) -> None:
    if not path.is_file():
        raise SystemExit(f"--vllm-python {path}: no such interpreter (make install-vllm makes .venv-vllm)")


def run(args: argparse.Namespace) -> SuiteResult:
    _check_vllm_python(args.vllm_python)
    config = {
        "vllm_python": str(args.vllm_python),
        "scenarios": [s.__dict__ for s in args.scenarios],
        "long_prompt_tokens": args.long_prompt,
        "repeats": args.repeats,
        "threads_per_server": args.threads,
        "vllm_kv_gib": args.vllm_kv_gib,
        "note": args.note,
    }
    with measuring("engines", args, config) as result:
        _measure(args, result)
    add_headlines(result, args.scenarios)
    return result


def _median_of(rows: list[dict[str, Any]], engine: str, scenario: str, key: str) -> float:
    return median([r[key] for r in rows if r["engine"] == engine and r["scenario"] == scenario])


def details(result: SuiteResult) -> str:
    lines = []
    for s in (Scenario(**s) for s in result.config["scenarios"]):
        native = _median_of(result.rows, NATIVE, s.key, s.metric)
        vllm = _median_of(result.rows, VLLM, s.key, s.metric)
        unit = "tok/s" if higher_is_better(s.metric) else "ms"
        ratio = median(native_over_vllm(result.rows, s.key, s.metric))
        lines.append(
            [s.label, s.concurrency, s.max_tokens, f"{native:.1f} {unit}", f"{vllm:.1f} {unit}", ratio]
        )
    probe = result.config.get("greedy_probe")
    probe_line = (
        f"Greedy probe ({probe['max_tokens']} tokens, base and each adapter): "
        f"{probe['identical']} of {probe['of']} outputs identical between the engines."
        if probe
        else "No greedy probe in this run."
    )
    errors = sum(r["errors"] for r in result.rows)
    note = f"\n\n{result.config['note']}" if result.config.get("note") else ""
    return (
        "Our server with --engine native vs --engine vllm; medians over repeats, ratios are medians of "
        "per-repeat native / vllm (tok/s: > 1 native faster; TTFT: < 1 native faster):\n\n"
        + markdown_table(["scenario", "concurrency", "max tokens", "native", "vllm", "native/vllm"], lines)
        + f"\n\n{probe_line} Failed requests: {errors}.{note}\n\n![engines](engines.png)"
    )


def plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [Scenario(**s) for s in result.config["scenarios"]]
    ratios = [median(native_over_vllm(result.rows, s.key, s.metric)) for s in rows]
    # TTFT rows inverted so that every bar reads "> 1: native ahead"
    ahead = [r if higher_is_better(s.metric) else 1 / r for r, s in zip(ratios, rows, strict=True)]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([s.key for s in rows], ahead)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("native ahead by (x; TTFT inverted)")
    fig.suptitle(f"--engine native vs --engine vllm, {result.machine.threads} thread(s)")
    save_figure(fig, folder / "engines.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the --quick defaults filled in."""
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON, help="interpreter of .venv-vllm"
    )
    parser.add_argument("--long-prompt", type=int, default=700, help="tokens of the unique-prompt rows")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--vllm-kv-gib", type=int, default=4, help="--kv-cache-memory-gb of the vllm side")
    parser.add_argument("--max-run-s", type=float, default=900, help="hard cap of one load run")
    parser.add_argument("--note", default="", help="a line for table.md (e.g. the machine was loaded)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.scenarios = engine_scenarios(args.quick, args.long_prompt)
    return args


if __name__ == "__main__":
    suite_main(parse_args, run, details, plot)
