"""One GPU run: the GPU tests and every GPU suite of issue 16, start to finish in about nine minutes.

The lent GPU machine has no internet and receives at most 64 MiB, so nothing heavy travels: the bases
are random-weight stand-ins built ON the device from configs (``lorayard.testing.random_base``), the 135M one
from the default base's config and tokenizer and the 8B Llama-shaped one from ``LLAMA_8B``. Two
halves:

    python -m bench.gpu_run prepare   # here, before: .gpu/like (config + tokenizer, ~4 MB) and
                                      # .gpu/wheels (what the GPU image lacks, ~40 MB)
    python3 -m bench.gpu_run run      # there, with carry [".gpu"]: results under $OUT

``run`` installs the carried wheels, builds the bases, then runs each step in its own process with its
own timeout (a failed or timed-out step is recorded and the next one runs), never past ``--budget``
seconds in all. It writes ``$OUT/summary.md`` (each step's status and time, then every suite's
table), ``$OUT/results.tar.gz`` (each suite's folder as ``bench/results/cuda/<suite>``, to unpack
over the repository) and ``$OUT/logs.tar.gz``: three files, inside the device's limit of eight.
The decode suites run twice, ``--decode-mode graph`` (the static decode step replayed as CUDA
graphs, which auto chooses on a GPU once this run has validated it) and ``--decode-mode eager``
(the packed pass, into ``<suite>_eager``), so the summary shows what the graphs buy.
``run --dry-run`` prints the steps without running them;
``run --only NAME...`` reruns some of them
(a step that needs a base needs its build step too, in the same run: the machine starts bare).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRIED = REPO / ".gpu"
"""What ``prepare`` writes and the run's ``carry`` names (ignored by git)."""

LIKE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
"""The default base's files the 135M stand-in is built from (no weights)."""

WHEELS = (
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "fastapi",
    "starlette",
    "uvicorn",
    "boto3",
    "botocore",
    "s3transfer",
    "jmespath",
    "xgrammar",
)
"""Runtime packages the GPU image lacks (bench/gpu_run.py's import check names any other), downloaded at
the versions this machine's venv holds; bitsandbytes (the 4-bit tests) is left out for its size."""


@dataclass(frozen=True)
class Step:
    """One command of the run: ``argv`` after ``python -m``, a timeout, and extra environment."""

    name: str
    argv: tuple[str, ...]
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    suite_out: str | None = None
    """The results folder a suite step writes (its name under bench/results/cuda/)."""


def steps(
    work: Path, quick: bool = False, *, device: str = "cuda", like: Path = CARRIED / "like"
) -> list[Step]:
    """The run, in priority order (what matters most first, the riskiest last). ``device`` cpu: the
    same plan on the CPU (its tests run a step of it there); ``like``: the 135M base's config source."""
    small, large = work / "bases" / "smollm2-135m-random", work / "bases" / "llama-8b-random"
    results = work / "results"
    small_env = {"LORAYARD_BASE_MODEL": str(small)}

    def suite(
        name: str, args: list[str], timeout_s: int, env: dict[str, str] | None = None, out: str | None = None
    ) -> Step:
        out = out or name
        return Step(
            out,
            ("bench." + name, "--device", device, *args, "--out", str(results / out)),
            timeout_s,
            env or small_env,
            out,
        )

    pytest = ("pytest", "-q", "-p", "no:cacheprovider", "--durations=10")
    graph, eager = ["--decode-mode", "graph"], ["--decode-mode", "eager"]
    # batch 1 only: the 8B base is bandwidth-bound, its roofline is the figure
    roofline_8b = ["--batches", "1", "--max-tokens", "32", "--copy-mb", "4096", "--no-profile"]
    return [
        Step(
            "build 135M base",
            (
                "lorayard.testing.random_base",
                str(small),
                "--like",
                str(like),
                "--device",
                device,
                "--dtype",
                "bfloat16",
            ),
            120,
        ),
        Step(
            "cuda tests",
            (
                *pytest,
                "tests/unit/server/engine/test_sampler_cuda.py",
                "tests/unit/server/engine/test_decode_graphs.py",
                "tests/unit/server/engine/test_stacked_lora.py",
                "tests/unit/server/engine/test_static_decode.py",
            ),
            120,
            small_env,
        ),
        Step(
            "engine tests on cuda",
            (*pytest, "-m", "gpu", "tests/unit/server/engine", "tests/unit/server/adapters"),
            150,
            # graph: every engine test that does not choose a mode replays CUDA graphs (auto is eager
            # until this run has validated them)
            {**small_env, "LORAYARD_TEST_DEVICE": device, "LORAYARD_TEST_DECODE_MODE": "graph"},
        ),
        suite(
            "decode_roofline",
            ["--batches", "1", "8", "64", "--max-tokens", "48", "--repeats", "2", "--no-profile", *graph],
            90,
        ),
        suite(
            "decode_roofline",
            ["--batches", "1", "8", "64", "--max-tokens", "32", "--repeats", "1", "--no-profile", *eager],
            60,
            out="decode_roofline_eager",
        ),
        suite("stacked_lora", ["--repeats", "3"], 60),
        suite("multi_adapter", ["--concurrency", "64", "--max-tokens", "32", "--repeats", "2", *graph], 120),
        suite(
            "multi_adapter",
            ["--concurrency", "64", "--max-tokens", "32", "--repeats", "1", *eager],
            90,
            out="multi_adapter_eager",
        ),
        suite(
            "naive",
            ["--concurrency", "16", "--max-tokens", "32", "--repeats", "2", "--no-profile", *graph],
            120,
        ),
        Step("http smoke", (*pytest, "tests/integration/server/test_gpu_smoke.py"), 120, small_env),
        Step(
            "build 8B base",
            (
                "lorayard.testing.random_base",
                str(large),
                "--like",
                str(CARRIED / "like"),
                "--llama-8b",
                "--device",
                "cuda",
                "--dtype",
                "bfloat16",
            ),
            180,
        ),
        suite(
            "decode_roofline",
            [*roofline_8b, "--repeats", "2", *graph],
            150,
            {"LORAYARD_BASE_MODEL": str(large)},
            out="decode_roofline_8b",
        ),
        suite(
            "decode_roofline",
            [*roofline_8b, "--repeats", "1", *eager],
            90,
            {"LORAYARD_BASE_MODEL": str(large)},
            out="decode_roofline_8b_eager",
        ),
    ][: 3 if quick else None]


def prepare() -> None:
    """Here, before the run: the default base's config and tokenizer, and the wheels the image lacks."""
    from importlib.metadata import version

    from lorayard.base_model import resolve_base_model

    like = CARRIED / "like"
    like.mkdir(parents=True, exist_ok=True)
    base = resolve_base_model().path
    for name in LIKE_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, like / name)
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28)] + [
        "--platform=manylinux2014_x86_64"
    ]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version=3.12",
        "--implementation=cp",
        *platforms,
        "-d",
        str(CARRIED / "wheels"),
        *(f"{name}=={version(name)}" for name in WHEELS),
    ]
    subprocess.run(command, check=True)
    size = sum(f.stat().st_size for f in CARRIED.rglob("*") if f.is_file())
    print(f"{CARRIED}: {size / 2**20:.1f} MiB; run with carry ['.gpu']")


def _install_wheels(work: Path) -> dict[str, str]:
    """Install the carried wheels whose package this Python lacks into a private folder; returns the
    environment that finds them. (A wheel's file name starts with its import name in every WHEELS.)"""
    from importlib.util import find_spec

    wheels = [
        w for w in sorted((CARRIED / "wheels").glob("*.whl")) if find_spec(w.name.split("-")[0]) is None
    ]
    site = work / "site"
    if wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--target",
                str(site),
                *map(str, wheels),
            ],
            check=True,
        )
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}


def _format_row(step: Step, status: str, seconds: float) -> str:
    return f"| {step.name} | {status} | {seconds:.0f} | `{shlex.join(step.argv)}` |"


def run(args: argparse.Namespace) -> int:
    """Run the plan (``args``: the ``run`` subcommand's options); 0 if every step passed."""
    out, work, budget_s = args.out, args.work, args.budget
    plan = [
        s
        for s in steps(work, args.quick, device=args.device, like=args.like)
        if not args.only or s.name in args.only
    ]
    if args.only and len(plan) < len(args.only):
        raise SystemExit(f"--only names unknown steps; the steps are {[s.name for s in steps(work)]}")
    if args.dry_run:
        for step in plan:
            env = " ".join(f"{k}={v}" for k, v in step.env.items())
            print(f"[{step.timeout_s:>3}s] {env} python -m {shlex.join(step.argv)}")
        return 0
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **_install_wheels(work),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "LORAYARD_CACHE": str(work / "cache"),
    }
    if shutil.which("nvidia-smi"):  # the GPU, driver and clocks the figures came from
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
        (logs / "nvidia-smi.txt").write_text(smi)
    rows = ["| step | status | s | command |", "|---|---|---|---|"]
    failures = 0
    for step in plan:
        left = budget_s - (time.monotonic() - start)
        if left < 20:
            rows.append(_format_row(step, "skipped: budget spent", 0))
            failures += 1
            continue
        began = time.monotonic()
        log = logs / (step.name.replace(" ", "_") + ".log")
        with log.open("w") as handle:
            try:
                code = subprocess.run(
                    [sys.executable, "-m", *step.argv],
                    cwd=REPO,
                    env={**env, **step.env},
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    timeout=min(step.timeout_s, left),
                ).returncode
                status = "ok" if code == 0 else f"**failed** (exit {code})"
            except subprocess.TimeoutExpired:
                status, code = f"**timed out** ({min(step.timeout_s, left):.0f} s)", -1
        failures += code != 0
        rows.append(_format_row(step, status, time.monotonic() - began))
        print(rows[-1], flush=True)
    tables = [
        (work / "results" / s.suite_out / "table.md").read_text()
        for s in plan
        if s.suite_out and (work / "results" / s.suite_out / "table.md").is_file()
    ]
    (out / "summary.md").write_text("\n".join(["# GPU run", "", *rows, "", *tables]))
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for s in plan:
            folder = work / "results" / (s.suite_out or "")
            if s.suite_out and folder.is_dir():
                tar.add(folder, arcname=f"bench/results/cuda/{s.suite_out}")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    print(f"{failures} step(s) did not pass; {time.monotonic() - start:.0f} s in all")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="here: write .gpu/ (config, tokenizer, wheels)")
    go = sub.add_parser("run", help="on the GPU machine: every step, results under --out")
    go.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "build/gpu-run")))
    go.add_argument("--work", type=Path, default=Path("/tmp/lorayard-gpu-run"), help="bases, logs, results")
    go.add_argument("--budget", type=float, default=560, help="seconds for every step together")
    go.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="run these steps (by name, e.g. a rerun of 'build 8B base' 'decode_roofline_8b')",
    )
    go.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    go.add_argument("--quick", action="store_true", help="the base and the tests only")
    go.add_argument("--device", default="cuda", help="cpu: the same steps on the CPU (a check of the plan)")
    go.add_argument("--like", type=Path, default=CARRIED / "like", help="config + tokenizer of the 135M base")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare()
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
