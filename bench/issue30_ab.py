"""issue30_ab: before/after ratios of issue 30's engine changes, in one process, alternating.

On a shared machine absolute timings swing by several times between minutes, so every figure here is
a ratio of two code paths timed back to back on the same inputs in the same process, the order
alternating per repeat, reported as the median (and range) of the per-repeat ratios. It drives the
model runner directly (no server, no scheduler): what is timed is the forward pass.

- ``prefill``: a 700-token prompt's attention alone (one layer's SDPA, SmolLM2's 9 query and 3 KV
  heads) over an explicit causal mask (before) against SDPA's own ``is_causal`` (after,
  :func:`~lorayard.server.engine.paged_attention.causal_prefill_attention`); the whole 700-token
  prefill pass with each; and the same prompt in chunks of 256 against one pass.
- ``dtype``: the same passes with the base in float32 against bfloat16 (``--dtype bfloat16``, whose
  linears run over prepacked weights since they were added): a 700-token prefill, a decode step of
  16 rows, a decode step of 1 row.
- ``prepack``: those three passes over plain ``F.linear`` (before) against prepacked weights (after),
  in bf16 (oneDNN, :mod:`lorayard.server.engine.prepacked_linear`, what the engine runs) and in
  float32 (MKL's packed sgemm packed for 16 rows, an experiment here only: other row counts fall
  back to the plain weight, which is why the engine does not use it; docs/performance.md).
- ``memory``: how much a bf16 engine adds to the process's RSS over the loaded base, prepacked
  against plain, each built in a fresh process (RSS is the process's, not an object's).

    python -m bench.issue30_ab [--repeats 5] [--only prefill|dtype|prepack|memory]
        [--out bench/results/issue30_ab]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from bench.workload import load_base
from lorayard.base_model import load_base_model
from lorayard.server.engine.engine import Engine
from lorayard.server.engine.model_runner import ModelRunner, PassRow
from lorayard.server.engine.paged_attention import PagedBatch
from lorayard.server.settings import Settings

PROMPT = 700
CONTEXT = 120
"""Keys each decode row sees (a short prompt plus some output)."""


SETTINGS = {"device": "cpu", "max_batch_size": 16, "max_model_len": 2048, "kv_cache_memory_gb": 0.5}


def engine(dtype: str) -> Engine:
    """An engine over the embedded base (not started: its runner is driven directly); the parity
    probe runs at construction, against HF in the same dtype."""
    settings = Settings(**SETTINGS, dtype=dtype)
    return Engine.from_base(load_base(), settings.engine_config(), eos_token_ids={2})


def plain_engine(dtype: torch.dtype) -> Engine:
    """The same engine with its linears left as the HF modules (F.linear): the before of ``prepack``."""
    model = load_base_model(load_base(), device="cpu", dtype=dtype).eval()
    return Engine(model, Settings(**SETTINGS).engine_config(), eos_token_ids={2}, prepack=False)


class MklPackedLinear(torch.nn.Module):
    """float32 over MKL's packed sgemm, packed for ``rows``-row passes (bench only): a pass of any
    other row count reads ``weight``, so the plain weight stays beside the packed one."""

    def __init__(self, linear: torch.nn.Linear, rows: int) -> None:
        super().__init__()
        self.weight, self.bias, self.rows = linear.weight, linear.bias, rows
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)


def mkl_engine(rows: int = 16) -> Engine:
    """A float32 engine whose decoder linears and lm_head run :class:`MklPackedLinear`."""
    eng = plain_engine(torch.float32)
    runner = eng.runner
    paths = ["lm_head"] + [
        f"{runner.arch.layers_path}.{i}.{path}"
        for i in range(len(runner.layers))
        for path in runner.arch.linear_paths.values()
    ]
    for path in paths:
        linear = runner.model.get_submodule(path)
        assert isinstance(linear, torch.nn.Linear), path
        runner.model.set_submodule(path, MklPackedLinear(linear, rows))
    runner.linears = [
        {key: layer.get_submodule(path) for key, path in runner.arch.linear_paths.items()}
        for layer in runner.layers
    ]
    return eng


@contextmanager
def masked_prefill() -> Iterator[None]:
    """The attention before issue 30: a fresh prompt's chunk goes through the masked kernels."""
    with mock.patch.object(PagedBatch, "fresh", property(lambda self: False)):
        yield


def sdpa(causal: bool, length: int = PROMPT, repeats: int = 10) -> Callable[[], None]:
    """One layer's prefill attention over ``length`` tokens, with the mask spelled out or is_causal."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, length, 64, generator=gen) for heads in (9, 3, 3))
    mask = (torch.arange(length)[None, :] <= torch.arange(length)[:, None]).view(1, 1, length, length)

    def run() -> None:
        for _ in range(repeats):
            if causal:
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return run


def blocks(runner: ModelRunner, first: int, tokens: int) -> list[int]:
    return list(range(first, first + -(-tokens // runner.block_size)))


def prefill(runner: ModelRunner, ids: list[int], chunk: int) -> None:
    table = blocks(runner, 1, len(ids))
    for start in range(0, len(ids), chunk):
        end = min(start + chunk, len(ids))
        runner.forward([PassRow(ids[start:end], start, table, None, "last" if end == len(ids) else "none")])


def decode(runner: ModelRunner, rows: int, steps: int = 4) -> None:
    size = blocks(runner, 0, CONTEXT + 1)
    batch = [
        PassRow([5 + r], CONTEXT, blocks(runner, 60 + r * len(size), CONTEXT + 1), None) for r in range(rows)
    ]
    for _ in range(steps):
        runner.forward(batch)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(
    name: str, before: Callable[[], None], after: Callable[[], None], repeats: int
) -> dict[str, object]:
    """before / after time ratios over ``repeats`` alternating pairs (one warm-up pair first)."""
    before()
    after()
    ratios, times = [], []
    for r in range(repeats):
        if r % 2 == 0:
            b, a = timed(before), timed(after)
        else:
            a, b = timed(after), timed(before)
        ratios.append(b / a)
        times.append((b, a))
    row = {
        "figure": name,
        "speedup_median": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "seconds_before_after": times,
    }
    print(f"{name}: {row['speedup_median']:.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    return row


def prepack_rows(ids: list[int], repeats: int) -> list[dict[str, object]]:
    """Plain F.linear (before) against prepacked weights (after) for a 700-token prefill and decode
    steps of 16 and 1 rows: bf16 over oneDNN (the engine's), float32 over MKL (the experiment)."""
    rows = []
    pairs: list[tuple[str, Callable[[], Engine], Callable[[], Engine]]] = [
        (
            "bf16 prepacked (oneDNN) vs bf16 F.linear",
            lambda: plain_engine(torch.bfloat16),
            lambda: engine("bfloat16"),
        ),
        ("fp32 MKL-packed for 16 rows vs fp32 F.linear", lambda: plain_engine(torch.float32), mkl_engine),
    ]
    for label, make_before, make_after in pairs:  # one pair of engines in memory at a time
        b, a = make_before().runner, make_after().runner
        passes = [
            ("700-token prefill", functools.partial(prefill, ids=ids, chunk=PROMPT)),
            ("decode step, 16 rows", functools.partial(decode, rows=16)),
            ("decode step, 1 row", functools.partial(decode, rows=1, steps=16)),
        ]
        for name, run in passes:
            rows.append(
                compare(f"{name}, {label}", functools.partial(run, b), functools.partial(run, a), repeats)
            )
    return rows


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status: the memory rows need Linux")


def engine_rss(prepack: bool) -> float:
    """MiB the RSS grows by while an engine (a tiny KV cache) is built over the loaded bf16 base."""
    model = load_base_model(load_base(), device="cpu", dtype=torch.bfloat16).eval()
    before = _rss_mib()
    settings = Settings(device="cpu", max_model_len=256, kv_cache_memory_gb=0.01)
    Engine(model, settings.engine_config(), eos_token_ids={2}, prepack=prepack)
    return _rss_mib() - before


def memory_rows() -> list[dict[str, object]]:
    """``engine_rss`` for prepacked and plain, each in a fresh process of this script."""
    rows: list[dict[str, object]] = []
    for variant in ("prepacked", "plain"):
        out = subprocess.run(
            [sys.executable, "-m", "bench.issue30_ab", "--rss-of", variant],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        mib = float(out.strip().splitlines()[-1])
        rows.append({"figure": f"RSS a bf16 engine adds to the loaded base, {variant}", "mib": mib})
        print(f"{rows[-1]['figure']}: {mib:.0f} MiB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["prefill", "dtype", "prepack", "memory"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="write result.json and table.md here")
    parser.add_argument(
        "--rss-of", choices=["prepacked", "plain"], help=argparse.SUPPRESS
    )  # memory_rows' child
    args = parser.parse_args(argv)
    if args.rss_of is not None:
        print(engine_rss(args.rss_of == "prepacked"))
        return
    torch.set_num_threads(args.threads)
    ids = torch.randint(100, 40000, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    f32 = engine("float32").runner
    rows = []
    if args.only in (None, "prefill"):
        rows.append(
            compare(
                "700-token attention (SDPA), is_causal vs mask", sdpa(False), sdpa(True), 3 * args.repeats
            )
        )

        def masked() -> None:
            with masked_prefill():
                prefill(f32, ids, PROMPT)

        rows.append(
            compare(
                "700-token prefill, causal kernel vs mask",
                masked,
                lambda: prefill(f32, ids, PROMPT),
                args.repeats,
            )
        )
        rows.append(
            compare(
                "700-token prefill, one pass vs chunks of 256",
                lambda: prefill(f32, ids, 256),
                lambda: prefill(f32, ids, PROMPT),
                args.repeats,
            )
        )
    if args.only in (None, "dtype"):
        bf16 = engine("bfloat16").runner
        rows.append(
            compare(
                "700-token prefill, bf16 vs fp32",
                lambda: prefill(f32, ids, PROMPT),
                lambda: prefill(bf16, ids, PROMPT),
                args.repeats,
            )
        )
        rows.append(
            compare(
                "decode step, 16 rows, bf16 vs fp32",
                lambda: decode(f32, 16),
                lambda: decode(bf16, 16),
                args.repeats,
            )
        )
        rows.append(
            compare(
                "decode step, 1 row, bf16 vs fp32",
                lambda: decode(f32, 1, 16),
                lambda: decode(bf16, 1, 16),
                args.repeats,
            )
        )
    if args.only in (None, "prepack"):
        rows += prepack_rows(ids, args.repeats)
    memory = memory_rows() if args.only in (None, "memory") else []
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        machine = {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        }
        command = " ".join(["python -m bench.issue30_ab", *sys.argv[1:]])
        result = {
            "command": command,
            "machine": machine,
            "repeats": args.repeats,
            "rows": rows,
            "memory": memory,
        }
        (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        lines = ["| figure (speedup: before / after time) | median | range |", "|---|---|---|"]
        lines += [
            f"| {r['figure']} | {r['speedup_median']:.2f}x | {r['speedup_min']:.2f}-{r['speedup_max']:.2f} |"
            for r in rows
        ]
        if memory:
            lines += ["", "| memory | MiB |", "|---|---|"]
            lines += [f"| {r['figure']} | {r['mib']:.0f} |" for r in memory]
        (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
