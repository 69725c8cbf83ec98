"""lora_ops against the explicit definition: y + scale * x @ A.T @ B.T per segment, DoRA's row scale."""

import pytest
import torch

from lorayard.adapter_files import AdapterWeights, LoraModule
from lorayard.server.engine.lora_ops import (
    FUSED_GROUPS,
    ResidentAdapter,
    Segment,
    apply_lora,
    apply_lora_group,
    segments_of,
)

IN = 12
OUT = {"q_proj": 12, "k_proj": 4, "v_proj": 4, "o_proj": 12}


def _module(
    out_features: int, rank: int, scaling: float, gen: torch.Generator, dora: bool = False
) -> LoraModule:
    magnitude = torch.rand(out_features, generator=gen) + 0.5 if dora else None
    return LoraModule(
        a=torch.randn(rank, IN, generator=gen),
        b=torch.randn(out_features, rank, generator=gen),
        scaling=scaling,
        magnitude=magnitude,
    )


def _adapter(
    key: str, seed: int, modules: dict[str, int], scaling: float
) -> tuple[ResidentAdapter, AdapterWeights]:
    gen = torch.Generator().manual_seed(seed)
    weights = AdapterWeights(
        config={},
        modules={(0, name): _module(OUT[name], rank, scaling, gen) for name, rank in modules.items()},
    )
    return ResidentAdapter.from_weights(key, weights, None, device="cpu", dtype=torch.float32), weights


def _reference_delta(x: torch.Tensor, module: LoraModule) -> torch.Tensor:
    return x @ module.a.T @ module.b.T * module.scaling


def test_segments_of_groups_contiguous_rows_and_skips_the_base():
    assert segments_of([None, 1, 1, 2, None, 2], [3, 1, 2, 1, 4, 2]) == [
        Segment(3, 6, 1),
        Segment(6, 7, 2),
        Segment(11, 13, 2),  # not merged: base rows lie between
    ]
    assert segments_of([None, None], [1, 1]) == []
    assert segments_of([], []) == []


def test_segments_of_needs_one_length_per_row():
    with pytest.raises(ValueError):
        segments_of([1, 2], [1])


def test_apply_lora_adds_each_segments_delta_and_leaves_other_rows_alone():
    first, first_w = _adapter("a", 0, {"q_proj": 4, "v_proj": 2}, scaling=2.0)
    second, second_w = _adapter("b", 1, {"q_proj": 8}, scaling=0.5)
    x = torch.randn(7, IN)
    y = torch.randn(7, OUT["q_proj"])
    base = y.clone()
    segments = [Segment(1, 3, 10), Segment(3, 6, 11)]  # row 0 and row 6: the plain base
    apply_lora(y, x, 0, "q_proj", segments, {10: first, 11: second})
    expected = base.clone()
    expected[1:3] += _reference_delta(x[1:3], first_w.modules[(0, "q_proj")])
    expected[3:6] += _reference_delta(x[3:6], second_w.modules[(0, "q_proj")])
    torch.testing.assert_close(y, expected)
    assert torch.equal(y[0], base[0]) and torch.equal(y[6], base[6])


def test_an_adapter_that_does_not_target_the_module_changes_nothing():
    adapter, _ = _adapter("a", 0, {"v_proj": 2}, scaling=1.0)
    x, y = torch.randn(3, IN), torch.randn(3, OUT["q_proj"])
    base = y.clone()
    apply_lora(y, x, 0, "q_proj", [Segment(0, 3, 0)], {0: adapter})
    assert torch.equal(y, base)
    apply_lora(y, x, 1, "v_proj", [Segment(0, 3, 0)], {0: adapter})  # layer 1 is not adapted
    assert torch.equal(y, base)


def test_dora_rescales_rows_by_magnitude_over_the_adapted_norm():
    gen = torch.Generator().manual_seed(3)
    module = _module(OUT["o_proj"], 4, 1.5, gen, dora=True)
    weights = AdapterWeights(config={}, modules={(0, "o_proj"): module})
    w = torch.randn(OUT["o_proj"], IN, generator=gen)
    adapter = ResidentAdapter.from_weights(
        "d", weights, {(0, "o_proj"): w}, device="cpu", dtype=torch.float32
    )
    x = torch.randn(5, IN)
    y = x @ w.T
    apply_lora(y, x, 0, "o_proj", [Segment(0, 5, 0)], {0: adapter})
    adapted = w + module.scaling * module.b @ module.a
    expected = module.magnitude / torch.linalg.norm(adapted, dim=1) * (x @ adapted.T)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_dora_without_the_base_weight_is_refused():
    gen = torch.Generator().manual_seed(4)
    weights = AdapterWeights(
        config={}, modules={(0, "o_proj"): _module(OUT["o_proj"], 2, 1.0, gen, dora=True)}
    )
    with pytest.raises(ValueError, match="DoRA"):
        ResidentAdapter.from_weights("d", weights, None, device="cpu", dtype=torch.float32)


def test_fused_group_equals_each_member_on_its_own():
    # q and v targeted (k not), different ranks; a second adapter targets k only.
    first, _ = _adapter("a", 5, {"q_proj": 4, "v_proj": 2}, scaling=2.0)
    second, _ = _adapter("b", 6, {"k_proj": 3}, scaling=1.0)
    adapters = {0: first, 1: second}
    assert [m.name for m in first.groups[(0, "qkv")].members] == ["q_proj", "v_proj"]
    assert first.groups[(0, "qkv")].a_t.shape == (IN, 6)
    x = torch.randn(6, IN)
    segments = [Segment(0, 2, 0), Segment(2, 5, 1)]
    names = FUSED_GROUPS["qkv"]
    fused = torch.randn(6, sum(OUT[n] for n in names))
    separate = {n: t.clone() for n, t in zip(names, fused.split([OUT[n] for n in names], dim=1), strict=True)}
    # column views of one fused output, as the model runner hands them on a GPU
    views = dict(zip(names, fused.split([OUT[n] for n in names], dim=1), strict=True))
    apply_lora_group(views, x, 0, "qkv", segments, adapters)
    for name in names:
        apply_lora(separate[name], x, 0, name, segments, adapters)
        torch.testing.assert_close(views[name], separate[name])
    assert torch.equal(views["q_proj"][5], separate["q_proj"][5])  # row 5 is in no segment


def test_resident_adapter_folds_the_scaling_into_b():
    adapter, weights = _adapter("a", 7, {"q_proj": 4}, scaling=3.0)
    module = weights.modules[(0, "q_proj")]
    resident = adapter.modules[(0, "q_proj")]
    torch.testing.assert_close(resident.a_t, module.a.T)
    torch.testing.assert_close(resident.b_t, (module.b * 3.0).T)
    assert adapter.nbytes == (module.a.numel() + module.b.numel()) * 4
