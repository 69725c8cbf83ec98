"""StackedLora against the segment path (lora_ops) and against PEFT's own LoRA layers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from lorayard.adapter_files import AdapterWeights, LoraModule, load_adapter
from lorayard.architectures import linear_shapes
from lorayard.server.engine.lora_ops import (
    FUSED_GROUPS,
    ResidentAdapter,
    apply_lora,
    apply_lora_group,
    segments_of,
)
from lorayard.server.engine.stacked_lora import ZERO_ROW, StackedLora, StackedLoraRefused

LAYERS = 2
# Llama-style separate linears (q/k/v and gate/up form groups) and Phi-3's fused ones (groups of one).
SEPARATE = {
    "q_proj": (16, 16),
    "k_proj": (16, 8),
    "v_proj": (16, 8),
    "o_proj": (16, 16),
    "gate_proj": (16, 24),
    "up_proj": (16, 24),
    "down_proj": (24, 16),
}
PHI3 = {"qkv_proj": (16, 32), "o_proj": (16, 16), "gate_up_proj": (16, 48), "down_proj": (24, 16)}
METHODS = ["masked", "gather"]


def _resident(
    key: str, seed: int, shapes: dict[str, tuple[int, int]], targets: dict[str, int], dora: bool = False
) -> ResidentAdapter:
    """A random plain LoRA (``targets``: module -> rank) in layer 0 and, for odd seeds, layer 1 too."""
    gen = torch.Generator().manual_seed(seed)
    layers = range(LAYERS) if seed % 2 else range(1)
    modules = {}
    for layer in layers:
        for name, rank in targets.items():
            fan_in, fan_out = shapes[name]
            modules[(layer, name)] = LoraModule(
                a=torch.randn(rank, fan_in, generator=gen),
                b=torch.randn(fan_out, rank, generator=gen),
                scaling=0.5 + seed,
                magnitude=torch.rand(fan_out, generator=gen) + 0.5 if dora else None,
            )
    weights = AdapterWeights(config={}, modules=modules)
    dense = (
        {k: torch.randn(shapes[k[1]][1], shapes[k[1]][0], generator=gen) for k in modules} if dora else None
    )
    return ResidentAdapter.from_weights(key, weights, dense, device="cpu", dtype=torch.float32)


def _groups(shapes: dict[str, tuple[int, int]]) -> list[tuple[str, tuple[str, ...]]]:
    """How the model runner calls a layer's linears: FUSED_GROUPS together, the rest one by one."""
    grouped = [(g, names) for g, names in FUSED_GROUPS.items() if all(n in shapes for n in names)]
    members = {n for _, names in grouped for n in names}
    return grouped + [(n, (n,)) for n in shapes if n not in members]


def _both_paths(
    shapes: dict[str, tuple[int, int]],
    adapters: list[ResidentAdapter],
    choice: list[int],
    method: str,
    r_max: int = 16,
) -> None:
    """Tokens with adapter ``choice[i]`` (-1: none) through the segment path and the stack agree."""
    stack = StackedLora(
        shapes,
        LAYERS,
        capacity=len(adapters) + 1,
        r_max=r_max,
        device="cpu",
        dtype=torch.float32,
        method=method,
    )
    row_of = {i: stack.write(i, a) for i, a in enumerate(adapters)}
    rows = stack.select(torch.tensor([ZERO_ROW if c < 0 else row_of[c] for c in choice]))
    # The segment path needs tokens grouped by adapter: order them so, then compare in that order.
    order = sorted(range(len(choice)), key=lambda i: choice[i])
    grouped = [choice[i] for i in order]
    segments = segments_of([None if c < 0 else c for c in grouped], [1] * len(grouped))
    by_slot = dict(enumerate(adapters))
    gen = torch.Generator().manual_seed(len(choice))
    n = len(choice)
    for layer in range(LAYERS):
        for group, names in _groups(shapes):
            x = torch.randn(n, shapes[names[0]][0], generator=gen)
            base = {m: torch.randn(n, shapes[m][1], generator=gen) for m in names}
            stacked = {m: t.clone() for m, t in base.items()}
            segment = {m: t[order].clone() for m, t in base.items()}
            if len(names) > 1:
                stack.apply_group(stacked, x, layer, group, rows)
                apply_lora_group(segment, x[order], layer, group, segments, by_slot)
            else:
                stack.apply(stacked[group], x, layer, group, rows)
                apply_lora(segment[group], x[order], layer, group, segments, by_slot)
            for m in names:
                torch.testing.assert_close(stacked[m][order], segment[m], rtol=1e-5, atol=1e-5)
                plain = [i for i, c in enumerate(choice) if c < 0]
                assert torch.equal(stacked[m][plain], base[m][plain])  # the zero row adds exactly 0


TARGET_SETS = [
    {"q_proj": 4, "v_proj": 2},
    {"q_proj": 8, "k_proj": 8, "v_proj": 8, "o_proj": 8, "gate_proj": 8, "up_proj": 8, "down_proj": 8},
    {"gate_proj": 16, "up_proj": 16, "down_proj": 16},
    {"k_proj": 1, "up_proj": 3, "o_proj": 5},
]


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    targets=st.lists(st.sampled_from(range(len(TARGET_SETS))), min_size=1, max_size=4),
    tokens=st.data(),
)
def test_stack_equals_the_segment_path_for_random_adapters_and_rows(method, targets, tokens):
    adapters = [_resident(f"a{i}", i, SEPARATE, TARGET_SETS[t]) for i, t in enumerate(targets)]
    choice = tokens.draw(st.lists(st.integers(-1, len(adapters) - 1), min_size=1, max_size=12))
    _both_paths(SEPARATE, adapters, choice, method)


@pytest.mark.parametrize("method", METHODS)
def test_phi3_fused_linears_are_stacked_as_single_modules(method):
    adapters = [
        _resident("all", 1, PHI3, {"qkv_proj": 8, "o_proj": 4, "gate_up_proj": 16, "down_proj": 2}),
        _resident("attn", 2, PHI3, {"qkv_proj": 3}),
    ]
    _both_paths(PHI3, adapters, [0, 1, -1, 0, 1, 1, -1], method)


@pytest.mark.parametrize("method", METHODS)
def test_every_row_at_full_rank_and_a_single_token(method):
    adapters = [_resident("a", 3, SEPARATE, {n: 16 for n in SEPARATE})]
    _both_paths(SEPARATE, adapters, [0], method)
    _both_paths(SEPARATE, adapters, [-1], method)


def _stack(capacity: int = 2, r_max: int = 8, method: str = "masked") -> StackedLora:
    return StackedLora(SEPARATE, LAYERS, capacity, r_max, device="cpu", dtype=torch.float32, method=method)


def _pointers(stack: StackedLora) -> list[int]:
    return [t.data_ptr() for layer in stack.layers for g in layer.values() for t in (g.a, *g.b.values())]


def test_evict_and_rewrite_happen_in_place():
    stack = _stack()
    pointers = _pointers(stack)
    first = _resident("a", 1, SEPARATE, {"q_proj": 8, "down_proj": 4})
    second = _resident("b", 2, SEPARATE, {"v_proj": 2})
    row_a, row_b = stack.write(1, first), stack.write(2, second)
    assert {row_a, row_b} == {1, 2} and stack.slot_at(row_a) == 1 and stack.row_of(2) == row_b
    stack.evict(1)
    assert stack.slot_at(row_a) is None and stack.row_of(1) is None
    x, y = torch.randn(3, 16), torch.zeros(3, 16)
    stack.apply(y, x, 0, "q_proj", stack.select(torch.tensor([row_a] * 3)))
    assert torch.equal(y, torch.zeros(3, 16))  # an evicted row is zero, not stale
    third = _resident("c", 3, SEPARATE, {"k_proj": 8})
    assert stack.write(3, third) == row_a
    assert _pointers(stack) == pointers
    _both_paths_after_rewrite(stack, third, row_a)


def _both_paths_after_rewrite(stack: StackedLora, resident: ResidentAdapter, row: int) -> None:
    """The rewritten row computes the new adapter's delta, nothing of the one before."""
    x = torch.randn(4, 16)
    outputs = {m: torch.zeros(4, SEPARATE[m][1]) for m in FUSED_GROUPS["qkv"]}
    stack.apply_group(outputs, x, 1, "qkv", stack.select(torch.tensor([row] * 4)))
    expected = {m: torch.zeros(4, SEPARATE[m][1]) for m in FUSED_GROUPS["qkv"]}
    apply_lora_group(expected, x, 1, "qkv", segments_of([0], [4]), {0: resident})
    for m in expected:
        torch.testing.assert_close(outputs[m], expected[m])
    assert torch.equal(outputs["q_proj"], torch.zeros(4, 16))  # adapter "a"'s q_proj is gone


def test_refusals_name_the_reason():
    stack = _stack(capacity=1, r_max=4)
    with pytest.raises(StackedLoraRefused, match="rank 8 in q_proj, above the stack's r_max 4"):
        stack.write(1, _resident("big", 1, SEPARATE, {"q_proj": 8}))
    dora = _resident("d", 2, SEPARATE, {"o_proj": 2}, dora=True)
    assert not stack.supports(dora)
    with pytest.raises(StackedLoraRefused, match="DoRA"):
        stack.write(2, dora)
    stack.write(3, _resident("one", 3, SEPARATE, {"q_proj": 2}))
    small = _resident("two", 4, SEPARATE, {"q_proj": 2})
    assert stack.supports(small)  # supported, but no row is free
    with pytest.raises(StackedLoraRefused, match="all 1 stacked rows are taken"):
        stack.write(4, small)
    phi = _resident("phi", 5, PHI3, {"qkv_proj": 2})
    with pytest.raises(StackedLoraRefused, match="qkv_proj of layer 0, which the stack has no buffer for"):
        stack.write(5, phi)
    with pytest.raises(ValueError, match="adapter slot 9 is not stacked"):
        stack.evict(9)
    with pytest.raises(ValueError, match="adapter slot 3 is stacked already"):
        stack.write(3, small)


@pytest.mark.parametrize("method", METHODS)
def test_stack_equals_peft_lora_layers_for_a_real_adapter(method, tiny_base_dir, tiny_adapters):
    """Every adapted linear of PEFT's own model, for the tiny base's all-linear and MLP (rsLoRA)
    adapters side by side in one batch with base-only tokens."""
    config = AutoConfig.from_pretrained(tiny_base_dir)
    names = ["all8", "mlp16"]
    stack = StackedLora.from_config(
        config, capacity=2, r_max=16, device="cpu", dtype=torch.float32, method=method
    )
    residents = {
        name: ResidentAdapter.from_weights(
            name, load_adapter(tiny_adapters / name, config), None, device="cpu", dtype=torch.float32
        )
        for name in names
    }
    rows_of = {name: stack.write(slot, residents[name]) for slot, name in enumerate(names)}
    peft_models = {
        name: PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32), tiny_adapters / name
        ).eval()
        for name in names
    }
    choice = ["all8", None, "mlp16", "all8", "mlp16", None]
    rows = stack.select(torch.tensor([ZERO_ROW if c is None else rows_of[c] for c in choice]))
    gen = torch.Generator().manual_seed(0)
    checked = 0
    with torch.no_grad():
        for layer in range(config.num_hidden_layers):
            for name, (fan_in, _) in linear_shapes(config).items():
                x = torch.randn(len(choice), fan_in, generator=gen)
                modules = {a: _peft_linear(model, layer, name) for a, model in peft_models.items()}
                first = next(iter(modules.values()))
                base = getattr(first, "base_layer", first)(x)  # an untargeted linear is the plain one
                y = base.clone()
                stack.apply(y, x, layer, name, rows)
                for i, adapter in enumerate(choice):
                    expected = base[i] if adapter is None else modules[adapter](x[i : i + 1])[0]
                    torch.testing.assert_close(y[i], expected, rtol=1e-5, atol=1e-5)
                    checked += adapter is not None
    assert checked > 0


def _peft_linear(model: PeftModel, layer: int, name: str) -> torch.nn.Module:
    block = model.base_model.model.model.layers[layer]
    return getattr(
        block.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else block.mlp, name
    )
