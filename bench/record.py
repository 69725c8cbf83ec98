"""Where and how a suite's results are written: machine info, JSON, a markdown table, a PNG.

Every suite writes ``bench/results/<suite>/result.json`` (the one source of truth), ``table.md`` and
one or more PNGs; ``bench/report.py`` builds bench/README.md from the JSON files only.
Headline figures are ratios of variants measured side by side in one run (interleaved, repeated,
medians), because the machine is shared and absolute numbers drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lorayard.client import stats

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class MachineInfo:
    """What the numbers were measured on."""

    cpu: str
    cores: int
    torch: str
    threads: int
    device: str
    gpu: str | None
    python: str

    @classmethod
    def current(cls, device: str) -> MachineInfo:
        gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None
        return cls(
            cpu=_cpu_model(),
            cores=os.cpu_count() or 1,
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            device=device,
            gpu=gpu,
            python=platform.python_version(),
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class SuiteResult:
    """One suite run: its headline ratios (name -> value, with the goal), raw rows, and context."""

    suite: str
    command: str
    machine: MachineInfo
    config: dict[str, Any]
    headline: list[dict[str, Any]] = field(default_factory=list)
    """Each: {"name", "value", "unit", "goal" (str or None), "met" (bool or None)}."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    duration_s: float = 0.0

    def add_headline(
        self, name: str, value: float, unit: str, goal: float | None = None, higher_is_better: bool = True
    ) -> None:
        met = None if goal is None else (value >= goal if higher_is_better else value <= goal)
        goal_text = None if goal is None else f"{'>=' if higher_is_better else '<='} {goal:g}"
        self.headline.append({"name": name, "value": value, "unit": unit, "goal": goal_text, "met": met})


def common_arguments(description: str) -> argparse.ArgumentParser:
    """The flags every suite takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="a smaller run (part of `make bench-quick`)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared box)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default bench/results/<suite>, bench/results/cuda/<suite> on a GPU)",
    )
    parser.add_argument(
        "--adapter-cache",
        type=Path,
        default=None,
        help="folder for the random adapters (default: model cache)",
    )
    return parser


def setup_torch(args: argparse.Namespace) -> None:
    """Apply --threads and check --device before anything is loaded."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


@contextmanager
def measuring(suite: str, args: argparse.Namespace, config: dict[str, Any]) -> Iterator[SuiteResult]:
    """Apply --threads/--device, then yield a result stamped with the command and machine; the time the
    block takes becomes its ``duration_s``."""
    setup_torch(args)
    result = SuiteResult(suite, command_line(), MachineInfo.current(args.device), config)
    start = time.perf_counter()
    yield result
    result.duration_s = time.perf_counter() - start


def paired_ratios(
    rows: list[dict[str, Any]],
    numerator: Any,
    denominator: Any,
    *,
    key: str = "tokens_per_s",
    by: str = "variant",
    **where: Any,
) -> list[float]:
    """Per repeat, ``key`` of the row whose ``by`` column is ``numerator`` over the one whose is
    ``denominator``, among rows matching ``where``: ratios of measurements taken back to back, which
    survive drift. Repeats missing either side (or with a zero denominator) are skipped."""
    by_repeat: dict[int, dict[Any, float]] = {}
    for row in rows:
        if all(row.get(k) == v for k, v in where.items()):
            by_repeat.setdefault(row["repeat"], {})[row[by]] = row[key]
    return [
        v[numerator] / v[denominator]
        for _, v in sorted(by_repeat.items())
        if numerator in v and v.get(denominator)
    ]


def suite_main(
    parse_args: Callable[[], argparse.Namespace],
    run: Callable[[argparse.Namespace], SuiteResult],
    details: Callable[[SuiteResult], str],
    plot: Callable[[SuiteResult, Path], None],
) -> None:
    """``python -m bench.<suite>``: measure, write result.json and table.md, draw the plots."""
    args = parse_args()
    result = run(args)
    plot(result, write_result(result, args.out, details(result)))


def command_line() -> str:
    """The command that reproduces this run, as a user would type it on their machine: a flag's value
    that is an absolute path outside the repository (this machine's llama.cpp tree, say) becomes the
    flag's name as a shell variable (``--llama-cpp-src "$LLAMA_CPP_SRC"``)."""
    module = Path(sys.argv[0]).stem
    return " ".join(["python", "-m", f"bench.{module}", *portable_args(sys.argv[1:])])


def portable_args(argv: list[str]) -> list[str]:
    """Shell-quoted ``argv`` with machine-specific path values replaced by ``"$FLAG_NAME"``."""
    repo = Path(__file__).resolve().parents[1]
    out: list[str] = []
    for i, arg in enumerate(argv):
        flag = argv[i - 1] if i > 0 else ""
        path = Path(arg)
        if flag.startswith("--") and path.is_absolute() and not path.resolve().is_relative_to(repo):
            out.append('"$' + flag[2:].replace("-", "_").upper() + '"')
        else:
            out.append(shlex.quote(arg))
    return out


def percentile(values: list[float], q: float) -> float:
    """The load tester's :func:`lorayard.client.stats.percentile` (linear, numpy's default), so both
    report the same p50 from the same data; NaN for no values, since a table cell reads better than a
    crash."""
    return stats.percentile(values, q) if values else float("nan")


def median(values: list[float]) -> float:
    return percentile(values, 50)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_rows(result: SuiteResult) -> list[list[str]]:
    """[figure, value, goal, met] per headline figure."""
    rows = []
    for h in result.headline:
        met = "" if h["met"] is None else ("yes" if h["met"] else "**no**")
        rows.append([h["name"], f"{h['value']:.3g} {h['unit']}".strip(), h["goal"] or "", met])
    return rows


def headline_table(result: SuiteResult) -> str:
    return markdown_table(["figure", "value", "goal", "met"], headline_rows(result))


def machine_line(machine: MachineInfo) -> str:
    gpu = f", GPU {machine.gpu}" if machine.gpu else ""
    return (
        f"{machine.cpu}, {machine.cores} cores{gpu}; torch {machine.torch}, {machine.threads} thread(s), "
        f"device {machine.device}, Python {machine.python}"
    )


def results_folder(suite: str, device: str, root: Path = RESULTS) -> Path:
    """Where a suite's full-size results live: ``bench/results/<suite>`` for the CPU,
    ``bench/results/<device>/<suite>`` otherwise, so a GPU run never replaces the CPU results."""
    return root / suite if device == "cpu" else root / device / suite


def write_result(result: SuiteResult, out: Path | None, details: str) -> Path:
    """Write result.json and table.md (headline, details, machine, command); returns the folder."""
    folder = out or results_folder(result.suite, result.machine.device)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    text = (
        f"# {result.suite}\n\n{headline_table(result)}\n\n{details}\n\n"
        f"Machine: {machine_line(result.machine)}.\n\n"
        f"Command: `{result.command}` ({result.duration_s:.0f} s, {result.started}).\n"
    )
    (folder / "table.md").write_text(text)
    print(text)
    return folder


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write (120 dpi PNG) and close a matplotlib figure: every suite's plots end so."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
