"""The static-shape decode step (``--decode-mode static``; ``graph`` replays the same step on CUDA):
equal to the packed pass and to PEFT for mixed adapter batches, padded ones and ones past the largest
bucket, with DoRA through the packed pass, padded rows confined to the scratch block, and preemption
and prefix caching unchanged (those two in test_preemption.py / test_prefix_cache.py, per mode)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lorayard.adapter_files import load_adapter
from lorayard.server.engine.block_pool import BlockSpec, KVBlockStorage
from lorayard.server.engine.config import resolve_decode_mode
from lorayard.server.engine.lora_ops import ResidentAdapter
from lorayard.server.engine.model_runner import ModelRunner, PassRow, StaticDecode
from lorayard.server.engine.parity_probe import PROBE_LENGTH, probe_runner
from lorayard.server.engine.types import Request, SamplingParams
from lorayard.server.settings import Settings

from ..conftest import peft_greedy
from .test_engine import PROMPTS, _collect, _load

BLOCK = 4
BLOCKS_PER_ROW = 4
"""Each runner-level request gets its own 4 blocks of 4 tokens (16 positions: max_model_len)."""

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _runner(model, adapters, static: StaticDecode | None, num_blocks: int) -> ModelRunner:
    config = model.config
    spec = BlockSpec.of_model(config, model.dtype, BLOCK)
    runner = ModelRunner(model, KVBlockStorage(spec, num_blocks, model.device), False, static)
    for slot, resident in adapters.items():
        runner.add_adapter(slot, resident)
    return runner


@pytest.fixture
def runners(tiny_base_dir, tiny_adapters, test_device):
    """(eager runner, static runner with buckets 1, 2, 4) over one tiny model, every adapter of the
    conftest resident in both (slot = its index: qv4, all8, mlp16, dora8)."""
    config = AutoConfig.from_pretrained(tiny_base_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).to(test_device).eval()
    adapters = {}
    for slot, name in enumerate(("qv4", "all8", "mlp16", "dora8")):
        weights = load_adapter(tiny_adapters / name, config)
        dense = {k: model.get_submodule(_module_path(*k)).weight for k in weights.modules}
        adapters[slot] = ResidentAdapter.from_weights(
            name, weights, dense, device=test_device, dtype=torch.float32
        )
    rows = 6
    scratch = rows * BLOCKS_PER_ROW
    static = StaticDecode("static", 4, BLOCK * BLOCKS_PER_ROW, scratch_block=scratch, stack_capacity=4)
    eager = _runner(model, adapters, None, scratch)
    return eager, _runner(model, adapters, static, scratch + 1)


def _module_path(layer: int, name: str) -> str:
    group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    return f"model.layers.{layer}.{group}.{name}"


def _decode(runner: ModelRunner, slots: list[int | None], steps: int) -> list[torch.Tensor]:
    """Prefill one prompt per row (each in blocks of its own), then ``steps`` decode passes of every
    row at once feeding back the greedy token; -> every decode pass's logits [rows, vocab]."""
    tables = [list(range(r * BLOCKS_PER_ROW, (r + 1) * BLOCKS_PER_ROW)) for r in range(len(slots))]
    prompts = [PROMPTS[r % len(PROMPTS)][:6] for r in range(len(slots))]
    rows = [PassRow(p, 0, t, s) for p, t, s in zip(prompts, tables, slots, strict=True)]
    last = torch.cat(runner.forward(rows))  # the packed pass
    out = []
    for step in range(steps):
        tokens = last.argmax(-1).tolist()
        decode = [PassRow([tok], 6 + step, t, s) for tok, t, s in zip(tokens, tables, slots, strict=True)]
        last = torch.cat(runner.forward(decode)).clone()
        out.append(last)
    return out


@pytest.mark.parametrize(
    ("slots", "bucket"),
    [
        ([None, 0, 2], 4),  # base, qv4, mlp16: padded to 4
        ([1], 1),
        ([1, 1, 0, None], 4),
        ([2, None], 2),
        ([None, None, None], 4),  # base rows only: the step without the stack
    ],
    ids=["3-in-4", "1", "4-in-4", "2-in-2", "base-3-in-4"],
)
def test_static_decode_equals_the_packed_pass(runners, slots, bucket):
    eager, static = runners
    expected, got = _decode(eager, slots, 6), _decode(static, slots, 6)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
    assert static.static_passes == {bucket: 6}
    # positions 6, 7 fit tables 2 blocks wide, 8 .. 11 need 3 blocks: the 4-wide bucket
    assert {width for _, width in static.graphs} == {2, 4}
    assert {with_lora for with_lora, _ in static.graphs} == {any(s is not None for s in slots)}
    assert not eager.static_passes


def test_past_the_largest_bucket_and_dora_run_the_packed_pass(runners):
    """Five rows (the largest bucket is 4), and a batch with the DoRA adapter the stack refused: both
    run the packed pass, with the same result as the eager runner."""
    eager, static = runners
    assert static.stack is not None and static.stack.row_of(3) is None  # dora8 is not stacked
    assert all(static.stack.row_of(slot) is not None for slot in (0, 1, 2))
    for slots in ([None, 0, 1, 2, None], [3, 0]):
        for want, have in zip(_decode(eager, slots, 3), _decode(static, slots, 3), strict=True):
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
    assert not static.static_passes


def test_padded_rows_write_only_the_scratch_block(runners):
    _, static = runners
    _decode(static, [None, 0, 2], 3)  # rows 0-2 own blocks 0-11; the step pads to 4 rows
    assert static.static_decode is not None
    scratch = static.static_decode.scratch_block
    for layer in range(len(static.layers)):
        for cache in (static.storage.k[layer], static.storage.v[layer]):
            assert cache[:, 3 * BLOCKS_PER_ROW : scratch].abs().sum() == 0  # nobody's blocks
            assert cache[:, scratch].abs().sum() > 0


def test_evict_and_rewrite_reuse_the_stacked_row(runners, tiny_base_dir, tiny_adapters):
    """The engine's slots are never reused; the stack's rows are: an evicted adapter's row is zeroed
    and the next adapter written into it, and decode under the new slot still equals eager."""
    eager, static = runners
    row = static.stack.row_of(0)
    static.remove_adapter(0)
    eager.remove_adapter(0)
    assert static.stack.row_of(0) is None and static.stack.slot_at(row) is None
    resident = eager.adapters[1]
    static.add_adapter(7, resident)
    eager.add_adapter(7, resident)
    assert static.stack.row_of(7) == row and static.stack.slot_at(row) == 7
    for want, have in zip(_decode(eager, [7, 1], 3), _decode(static, [7, 1], 3), strict=True):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)


def test_static_engine_matches_peft_for_a_padded_mixed_batch(make_engine, tiny_base_dir, tiny_adapters):
    """Three requests at once (base, qv4, mlp16) decode together padded to bucket 4, each equal to
    PEFT's greedy output; then a DoRA request beside them decodes through the packed pass."""
    engine = make_engine(decode_mode="static", max_batch_size=4, max_model_len=128)
    assert engine.decode_mode == "static" and engine.kv.num_blocks == engine.pool.num_blocks + 1
    names = ["qv4", "mlp16", "dora8"]
    handles = {name: _load(engine, tiny_base_dir, tiny_adapters, name) for name in names}
    max_tokens = 10

    async def run(cases):
        engine.start()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return await asyncio.gather(
            *(
                _collect(engine, Request(uuid.uuid4().hex, prompt, params, handles.get(name)))
                for name, prompt in cases
            )
        )

    first = [(None, PROMPTS[0]), ("qv4", PROMPTS[1]), ("mlp16", PROMPTS[2])]
    second = [("dora8", PROMPTS[0]), ("qv4", PROMPTS[2])]
    for cases in (first, second):
        before = sum(engine.runner.static_passes.values())
        results = asyncio.run(run(cases))
        for (name, prompt), (tokens, last) in zip(cases, results, strict=True):
            adapter = None if name is None else tiny_adapters / name
            assert last.error is None
            assert tokens == peft_greedy(tiny_base_dir, adapter, prompt, max_tokens), name
        if cases is first:
            assert engine.runner.static_passes[4] >= max_tokens - 2
        else:  # every decode pass holds the DoRA row until it finishes
            assert sum(engine.runner.static_passes.values()) == before


def test_the_startup_probe_checks_the_static_step_against_hf(make_engine):
    """An engine with a static step probes it at startup: the probe's decode positions go through the
    step (over the probe's own blocks, never the engine's), against HF's forward."""
    engine = make_engine(decode_mode="static", max_batch_size=4, max_model_len=64)
    result = probe_runner(engine.model, engine.runner)
    assert result.ok and result.static_decode_steps == PROBE_LENGTH - 10  # after two chunks of 5
    assert not engine.runner.static_passes  # the engine's own step never ran
    eager = make_engine(max_batch_size=4, max_model_len=64)
    assert probe_runner(eager.model, eager.runner).static_decode_steps == 0


def test_the_decode_mode_setting():
    assert Settings().decode_mode == "auto"
    assert resolve_decode_mode("auto", "cpu", None) == "eager"
    assert resolve_decode_mode("auto", "cuda", None) == "eager"  # until a GPU run validates graphs
    assert resolve_decode_mode("graph", "cuda:1", None) == "graph"
    assert resolve_decode_mode("static", "cpu", None) == "static"
    with pytest.raises(ValueError, match="--decode-mode graph needs a CUDA device"):
        resolve_decode_mode("graph", "cpu", None)


@cuda
def test_graph_decode_on_cuda_equals_the_packed_pass(tiny_base_dir, tiny_adapters):
    """The same step captured per bucket and replayed: logits equal the eager runner's."""
    config = AutoConfig.from_pretrained(tiny_base_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).to("cuda").eval()
    adapters = {
        slot: ResidentAdapter.from_weights(
            name, load_adapter(tiny_adapters / name, config), None, device="cuda", dtype=torch.float32
        )
        for slot, name in enumerate(("qv4", "all8", "mlp16"))
    }
    scratch = 6 * BLOCKS_PER_ROW
    graph = StaticDecode("graph", 4, BLOCK * BLOCKS_PER_ROW, scratch_block=scratch, stack_capacity=4)
    eager = _runner(model, adapters, None, scratch)
    graphed = _runner(model, adapters, graph, scratch + 1)
    for slots in ([None, 0, 2], [1], [1, 1, 0, None], [None, None]):
        for want, have in zip(_decode(eager, slots, 4), _decode(graphed, slots, 4), strict=True):
            torch.testing.assert_close(have, want, rtol=1e-3, atol=1e-3)
    for width in (2, 4):  # positions 6, 7 in tables 2 blocks wide; 8, 9 in 4
        assert graphed.graphs[True, width].captured == (1, 4)  # the passes with an adapter row
        assert graphed.graphs[False, width].captured == (2,)  # base rows only: no stack


def _poisoned(resident: ResidentAdapter) -> ResidentAdapter:
    """``resident`` with inf in every B: what lora_alpha 1e308 made before load refused it (built here
    past the checks, as if one got through)."""
    from lorayard.server.engine.lora_ops import LoraLinearWeights

    modules = {
        k: LoraLinearWeights(w.a_t.clone(), torch.full_like(w.b_t, float("inf")))
        for k, w in resident.modules.items()
    }
    return ResidentAdapter("poisoned", modules)


def test_an_adapter_with_inf_weights_never_reaches_other_rows_or_the_scratch_block(runners):
    """Issue 23.2: a non-finite adapter beside the base and another adapter in a padded static step.
    The stack refuses it (its inf times the other rows' masked-out zeros would be NaN everywhere), so
    its rows run the packed pass (its NaN K/V are stored bounded); the other rows and every later pass
    equal the eager runner, and the scratch block that pads every table stays finite."""
    eager, static = runners
    hostile = _poisoned(eager.adapters[0])
    with pytest.raises(ValueError, match="not finite"):
        from lorayard.server.engine.lora_ops import _require_finite

        for where, weights in hostile.modules.items():
            _require_finite("poisoned", where, weights)
    static.add_adapter(9, hostile)
    assert static.stack is not None and not static.stack.supports(hostile)
    got = _decode(static, [None, 9, 0], 2)
    want = _decode(eager, [None, 0, 0], 2)  # rows 0 and 2 as there (row 1: another prompt)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g[[0, 2]], w[[0, 2]], rtol=1e-4, atol=1e-4)
    static.remove_adapter(9)
    scratch = static.static_decode.scratch_block
    assert all(torch.isfinite(static.storage.k[i][:, scratch]).all() for i in range(len(static.layers)))
    for want, have in zip(_decode(eager, [None, 0, 2], 3), _decode(static, [None, 0, 2], 3), strict=True):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
    assert static.static_passes[4] == 3  # the later passes ran the static step, padded


def test_masking_selects_so_a_nan_token_stays_in_its_row():
    """A token whose activations are NaN (its own adapter's doing) adds nothing to another token:
    the mask selects columns instead of multiplying them by zero."""
    from lorayard.server.engine.stacked_lora import StackedLora

    shapes = {"q_proj": (16, 16)}
    stack = StackedLora(shapes, 1, 2, 4, device="cpu", dtype=torch.float32, method="masked")
    rows = stack.select(torch.tensor([0, 0]))
    x = torch.randn(2, 16)
    x[1] = float("nan")
    y = torch.zeros(2, 16)
    stack.apply(y, x, 0, "q_proj", rows)
    assert torch.equal(y[0], torch.zeros(16))
