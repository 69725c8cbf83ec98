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

- ``layout``: the KV cache's block layout. Ours, head-major ``[kv_heads, blocks, 16, hd]`` (before),
  against blocks-first ``[blocks, kv_heads, 16, hd]`` and vLLM's token-major ``[blocks, 16, kv_heads,
  hd]`` (after): one layer's K gather for 16 rows, and whole decode steps of 16 and 64 rows. The
  other layouts run the engine's own runner with its decode kernel and K/V write swapped for their
  layout's (here only, patched in), over a copy of the cache in that layout; their logits are checked
  against ours before timing.
- ``sampler``: the sampled rows' token choice (:mod:`~lorayard.server.engine.sampler`) before (a
  full sort of the vocabulary for top-p, ``torch.multinomial``; patched back in here) and after
  (top-p over the best ``TOP_P_CANDIDATES`` first, an inverse-CDF draw), for 16 rows of the base's
  own next-token logits over a text prompt: temperature alone, with top_p 0.9, with top_k 50; and a
  whole decode step of 16 rows plus their sampling at top_p 0.9.
- ``--compile`` (opt-in: 1-2 minutes of compiling on 2 cores, into a fresh inductor cache): the
  static decode step (``--decode-mode static``, one bucket: 16 rows, tables 8 blocks wide) under
  ``torch.compile`` (static shapes, inductor) against the same step eager and against the packed pass; the row
  records the compile time and the largest logit difference from the eager step.

    python -m bench.issue30_ab [--repeats 5] [--only prefill|dtype|prepack|memory|layout|sampler]
        [--compile] [--out bench/results/issue30_ab]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal
from unittest import mock

import torch
import torch.nn.functional as F

from bench.workload import bench_prompt, load_base
from lorayard.base_model import load_base_model
from lorayard.server.engine import model_runner, paged_attention, sampler
from lorayard.server.engine.block_pool import KVBlockStorage
from lorayard.server.engine.engine import Engine
from lorayard.server.engine.model_runner import ModelRunner, PassRow
from lorayard.server.engine.paged_attention import LayerAttention, PagedBatch, attend, bounded_kv, gather_kv
from lorayard.server.engine.sampler import SequenceState, sample_row
from lorayard.server.engine.types import SamplingParams
from lorayard.server.settings import Settings

PROMPT = 700
CONTEXT = 120
"""Keys each decode row sees (a short prompt plus some output)."""


SETTINGS = {"device": "cpu", "max_batch_size": 16, "max_model_len": 2048, "kv_cache_memory_gb": 0.5}


def engine(dtype: str, decode_mode: str = "eager") -> Engine:
    """An engine over the embedded base (not started: its runner is driven directly); the parity
    probe runs at construction, against HF in the same dtype."""
    settings = Settings(**SETTINGS, dtype=dtype, decode_mode=decode_mode)
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
    batch = decode_rows(runner, rows)
    for _ in range(steps):
        runner.forward(batch)


def decode_rows(runner: ModelRunner, rows: int) -> list[PassRow]:
    """``rows`` decode rows of CONTEXT + 1 keys each, every row's blocks its own."""
    width = len(blocks(runner, 0, CONTEXT + 1))
    return [PassRow([5 + r], CONTEXT, blocks(runner, 60 + r * width, CONTEXT + 1), None) for r in range(rows)]


Layout = Literal["blocks_first", "token_major"]
"""The block layouts tried against ours: [blocks, kv_heads, bs, hd] and [blocks, bs, kv_heads, hd]."""


def relaid(storage: KVBlockStorage, layout: Layout) -> KVBlockStorage:
    """A copy of the storage (same contents) in ``layout``, from ours [kv_heads, blocks, bs, hd]."""
    order = (1, 0, 2, 3) if layout == "blocks_first" else (1, 2, 0, 3)
    other = copy.copy(storage)
    other.k = [t.permute(order).contiguous() for t in storage.k]
    other.v = [t.permute(order).contiguous() for t in storage.v]
    return other


def gather_in(layout: Layout, cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """``layout``'s gather: -> [R, kv_heads, length, hd], as :func:`gather_kv` returns for ours.
    Blocks-first needs a second copy to merge the block axes (kv_heads sits between them); token-major
    returns a strided view (tokens kv_heads * hd apart), which SDPA reads as it is."""
    r, m = tables.shape
    gathered = cache.index_select(0, tables.reshape(-1))
    if layout == "blocks_first":
        _, kv_heads, bs, hd = cache.shape
        merged = gathered.view(r, m, kv_heads, bs, hd).transpose(1, 2).reshape(r, kv_heads, m * bs, hd)
        return merged[:, :, :length]
    _, bs, kv_heads, hd = cache.shape
    return gathered.view(r, m * bs, kv_heads, hd)[:, :length].transpose(1, 2)


def write_in(
    layout: Layout,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """``layout``'s K/V write: k, v [T, kv_heads, hd] to their slots, bounded as ours are."""
    if layout == "blocks_first":
        bs = k_cache.shape[2]
        blocks_, offsets = slots // bs, slots % bs
        k_cache[blocks_, :, offsets] = bounded_kv(k, k_cache.dtype)
        v_cache[blocks_, :, offsets] = bounded_kv(v, v_cache.dtype)
        return
    kv_heads, hd = k_cache.shape[2:]
    k_cache.view(-1, kv_heads, hd)[slots] = bounded_kv(k, k_cache.dtype)
    v_cache.view(-1, kv_heads, hd)[slots] = bounded_kv(v, v_cache.dtype)


@contextmanager
def kv_layout(layout: Layout) -> Iterator[None]:
    """The runner's decode kernel and K/V write in ``layout`` (the decode step's only readers of the
    cache), everything else unchanged."""

    def rows(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        tables: torch.Tensor,
        length: int,
        mask: torch.Tensor,
        layer: LayerAttention,
    ) -> torch.Tensor:
        r, heads, hd = q.shape
        kv_heads = k_cache.shape[1 if layout == "blocks_first" else 2]
        keys = gather_in(layout, k_cache, tables, length)
        values = gather_in(layout, v_cache, tables, length)
        out = attend(q.view(r, kv_heads, heads // kv_heads, hd), keys, values, mask, layer=layer, gqa=False)
        return out.reshape(r, heads, hd)

    def write(*args: torch.Tensor) -> None:
        write_in(layout, *args)

    with (
        mock.patch.object(paged_attention, "_decode_rows", rows),
        mock.patch.object(model_runner, "write_kv", write),
    ):
        yield


def layout_runner(runner: ModelRunner, layout: Layout, rows: int) -> ModelRunner:
    """The runner over a copy of its cache in ``layout``; refused unless one decode step's logits
    match ours (both write the same new K/V, then read the same keys)."""
    other = runner.over(relaid(runner.storage, layout))
    batch = decode_rows(runner, rows)
    ours = runner.forward(batch)
    with kv_layout(layout):
        theirs = other.forward(batch)
    for a, b in zip(ours, theirs, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    return other


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


def repeated(fn: Callable[[], object], times: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(times):
            fn()

    return run


def relaid_decode(runner: ModelRunner, layout: Layout, rows: int) -> Callable[[], None]:
    """:func:`decode` of ``rows`` rows in ``layout`` (over a checked copy of the cache)."""
    other = layout_runner(runner, layout, rows)

    def run() -> None:
        with kv_layout(layout):
            decode(other, rows)

    return run


def layout_rows(runner: ModelRunner, repeats: int) -> list[dict[str, object]]:
    """Ours against each other block layout: one layer's K gather (16 rows), decode steps of 16 and 64."""
    found = []
    width = len(blocks(runner, 0, CONTEXT + 1))
    tables = torch.tensor([blocks(runner, 60 + r * width, CONTEXT + 1) for r in range(16)])
    ours = functools.partial(gather_kv, runner.storage.k[0], tables, CONTEXT + 1)
    layouts: tuple[Layout, ...] = ("blocks_first", "token_major")
    for layout in layouts:
        theirs = functools.partial(
            gather_in, layout, relaid(runner.storage, layout).k[0], tables, CONTEXT + 1
        )
        name = f"K gather of 16 rows x {CONTEXT + 1} keys, one layer, {layout} vs ours"
        found.append(compare(name, repeated(ours, 100), repeated(theirs, 100), 3 * repeats))
        for n in (16, 64):
            name = f"decode step, {n} rows, {layout} vs ours"
            found.append(
                compare(name, functools.partial(decode, runner, n), relaid_decode(runner, layout, n), repeats)
            )
    return found


def sorted_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The sampler's top-k / top-p before issue 30's change: top-p sorts the whole vocabulary."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def multinomial_draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """The sampler's draw before issue 30's change."""
    return int(torch.multinomial(probs, 1, generator=generator))


@contextmanager
def sampler_before() -> Iterator[None]:
    with (
        mock.patch.object(sampler, "top_k_top_p", sorted_top_k_top_p),
        mock.patch.object(sampler, "draw", multinomial_draw),
    ):
        yield


def text_logits(runner: ModelRunner, rows: int) -> torch.Tensor:
    """[rows, vocab]: the base's next-token logits at the last ``rows`` positions of a text prompt."""
    ids = bench_prompt(load_base(), CONTEXT)
    logits = runner.forward([PassRow(ids, 0, blocks(runner, 1, len(ids)), None, "all")])[0]
    assert logits is not None
    return logits[-rows:]


def sample_rows(logits: torch.Tensor, params: SamplingParams) -> Callable[[], None]:
    def run() -> None:
        for row in logits:
            sample_row(row, SequenceState.create(params, [1]), frozenset({2}))

    return run


def before(fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with sampler_before():
            fn()

    return run


def sampler_rows(runner: ModelRunner, repeats: int) -> list[dict[str, object]]:
    """Sampling 16 rows before / after, alone and after their decode step."""
    logits = text_logits(runner, 16)
    found = []
    for label, top_p, top_k in (("", 1.0, 0), (", top_p 0.9", 0.9, 0), (", top_k 50", 1.0, 50)):
        params = SamplingParams(max_tokens=1, temperature=0.7, top_p=top_p, top_k=top_k)
        run = repeated(sample_rows(logits, params), 5)
        name = f"sampling 16 rows (temperature 0.7{label}), after vs before"
        found.append(compare(name, before(run), run, 3 * repeats))
    params = SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9)

    def step() -> None:
        decode(runner, 16, 1)
        sample_rows(logits, params)()

    found.append(
        compare("decode step + sampling, 16 rows (top_p 0.9), after vs before", before(step), step, repeats)
    )
    return found


def compile_rows(repeats: int) -> list[dict[str, object]]:
    """The static decode step of 16 rows compiled (static shapes) against it eager and the packed pass."""
    runner = engine("float32", "static").runner
    batch = decode_rows(runner, 16)
    inputs = runner._static_batch(batch)
    assert inputs is not None, "16 decode rows of the base run the static step"
    wrapper = runner._wrapper(False, inputs["block_tables"].shape[1])
    for name, tensor in inputs.items():
        wrapper.buffers[name][:16].copy_(tensor)
    views = {name: buffer[:16] for name, buffer in wrapper.buffers.items()}
    step = functools.partial(runner._static_step, with_lora=False)
    compiled = torch.compile(step, dynamic=False)

    def eager() -> None:
        with torch.inference_mode():
            step(views)

    def fast() -> None:
        with torch.inference_mode():
            compiled(views)

    # A fresh inductor cache: what a first start pays (a warm on-disk cache from an earlier run
    # makes it a fraction of that).
    with (
        tempfile.TemporaryDirectory() as cache,
        mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": cache}),
        torch.inference_mode(),
    ):
        reference = step(views)
        start = time.perf_counter()
        out = compiled(views)
        seconds = time.perf_counter() - start
    difference = float((out - reference).abs().max())
    print(f"compile (cold cache): {seconds:.0f} s, largest logit difference {difference:.2g}", flush=True)
    rows = [
        compare(
            "static decode step, 16 rows, compiled vs eager", repeated(eager, 4), repeated(fast, 4), repeats
        ),
        compare(
            "decode step, 16 rows, compiled static step vs packed pass",
            functools.partial(decode, runner, 16),
            repeated(fast, 4),
            repeats,
        ),
    ]
    for row in rows:
        row["compile_seconds"] = seconds
        row["largest_logit_difference"] = difference
        row["same_argmax"] = bool((out.argmax(-1) == reference.argmax(-1)).all())
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--only", choices=["prefill", "dtype", "prepack", "memory", "layout", "sampler"], default=None
    )
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd static step")
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
    if args.only in (None, "layout"):
        rows += layout_rows(f32, args.repeats)
    if args.only in (None, "sampler"):
        rows += sampler_rows(f32, args.repeats)
    if args.compile:
        rows += compile_rows(args.repeats)
    memory = memory_rows() if args.only in (None, "memory") else []
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["python", "-m", "bench.issue30_ab", *(sys.argv[1:] if argv is None else argv)])
        machine = {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        }
        result = {
            "command": command,
            "machine": machine,
            "repeats": args.repeats,
            "rows": rows,
            "memory": memory,
        }
        (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        lines = [
            f"`{command}`",
            "",
            "| figure (speedup: before / after time) | median | range |",
            "|---|---|---|",
        ]
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
