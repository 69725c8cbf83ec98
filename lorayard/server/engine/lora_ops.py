"""Heterogeneous LoRA in one forward pass: every row of a batch applies its own adapter.

Rows are kept sorted by adapter so each adapter's rows form one contiguous segment (LoRAX's idea);
for each segment the delta is two small matmuls on views of the activations, so rows without an
adapter cost nothing and adapters of different ranks and target modules mix freely. Base weights
are never merged or modified.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lorayard.adapter_files import AdapterWeights


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, end)`` of the flattened batch use the adapter in engine slot ``adapter_slot``."""

    start: int
    end: int
    adapter_slot: int


def segments_of(adapter_slots: list[int | None], row_lengths: list[int]) -> list[Segment]:
    """Segments for rows already grouped by adapter; rows with ``None`` (plain base) get none.

    adapter_slots[i], row_lengths[i]: row i's adapter and how many tokens it contributes.
    """
    segments: list[Segment] = []
    start = 0
    for slot, length in zip(adapter_slots, row_lengths, strict=True):
        end = start + length
        if slot is not None:
            if segments and segments[-1].adapter_slot == slot and segments[-1].end == start:
                segments[-1] = Segment(segments[-1].start, end, slot)
            else:
                segments.append(Segment(start, end, slot))
        start = end
    return segments


@dataclass(frozen=True)
class LoraLinearWeights:
    """One adapted linear layer, laid out for ``x @ a_t @ b_t``.

    a_t: [in_features, rank]; b_t: [rank, out_features] with the LoRA scaling (and DoRA's row
    scale) folded in; row_scale: DoRA's ``g = m / ||W + s B A||`` per output feature, or None;
    bias_shift: ``(1 - g) * bias`` [out_features] for a DoRA linear with a bias (GPT-2, OPT, Qwen2's
    q/k/v), which PEFT leaves unscaled, or None.
    """

    a_t: torch.Tensor
    b_t: torch.Tensor
    row_scale: torch.Tensor | None = None
    bias_shift: torch.Tensor | None = None


FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "gate_up": ("gate_proj", "up_proj"),
}
"""Linears that read the same input (on a GPU the model runner also computes each group's base output
as one matmul over a fused weight, members' outputs side by side in this order); the adapter's A
matrices are concatenated, so one matmul per segment computes every member's ``x @ A^T``."""


@dataclass(frozen=True)
class GroupMember:
    """One targeted member of a fused group: its columns ``first:end`` of the group's ``a_t``."""

    name: str
    first: int
    end: int
    weights: LoraLinearWeights


@dataclass(frozen=True)
class FusedLoraGroup:
    """The LoRA of the members of one FUSED_GROUPS entry that an adapter targets, in one layer.

    a_t: [in_features, sum of member ranks].
    """

    a_t: torch.Tensor
    members: tuple[GroupMember, ...]


class ResidentAdapter:
    """An adapter's weights in engine memory, indexed by (layer, module short name)."""

    def __init__(self, key: str, modules: dict[tuple[int, str], LoraLinearWeights]) -> None:
        self.key = key
        self.modules = modules
        self.groups = _fuse(modules)
        """(layer, group name) -> FusedLoraGroup; members' a_t are views into the group's a_t."""

    @property
    def nbytes(self) -> int:
        return sum(m.a_t.nbytes + m.b_t.nbytes for m in self.modules.values())

    @classmethod
    def from_weights(
        cls,
        key: str,
        weights: AdapterWeights,
        base_weight: dict[tuple[int, str], torch.Tensor] | None,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        base_bias: dict[tuple[int, str], torch.Tensor] | None = None,
    ) -> ResidentAdapter:
        """Fold scaling into B; for DoRA compute the row scale from the dense base weight once (and,
        for a linear in ``base_bias``, the shift that keeps its bias out of the rescale)."""
        modules = {}
        for key_, module in weights.modules.items():
            a = module.a.to(device=device, dtype=torch.float32)
            b = module.b.to(device=device, dtype=torch.float32)
            row_scale = bias_shift = None
            b_t = (b * module.scaling).T
            if module.magnitude is not None:
                if base_weight is None or key_ not in base_weight:
                    raise ValueError("DoRA needs the dense base weight")
                w = base_weight[key_].to(device=device, dtype=torch.float32)
                norm = torch.linalg.norm(w + module.scaling * (b @ a), dim=1)
                row_scale = module.magnitude.to(device=device, dtype=torch.float32) / norm
                b_t = b_t * row_scale[None, :]
                if base_bias is not None and key_ in base_bias:
                    bias_shift = (1 - row_scale) * base_bias[key_].to(device=device, dtype=torch.float32)
            weights_ = LoraLinearWeights(
                a_t=a.T.contiguous().to(dtype),
                b_t=b_t.contiguous().to(dtype),
                row_scale=None if row_scale is None else row_scale.to(dtype),
                bias_shift=None if bias_shift is None else bias_shift.to(dtype),
            )
            _require_finite(key, key_, weights_)
            modules[key_] = weights_
        return cls(key, modules)


def _require_finite(adapter: str, where: tuple[int, str], weights: LoraLinearWeights) -> None:
    """Refuse what would put inf or NaN in the forward: scaling folded into B can overflow the serving
    dtype (float16's range ends at 65504), and DoRA's ``m / ||W + s B A||`` does for a zero norm."""
    layer, name = where
    if not torch.isfinite(weights.b_t).all():
        raise ValueError(
            f"adapter {adapter}: layer {layer} {name}: lora_alpha / r times lora_B is not finite "
            f"in {weights.b_t.dtype}"
        )
    if weights.row_scale is not None and not torch.isfinite(weights.row_scale).all():
        raise ValueError(
            f"adapter {adapter}: layer {layer} {name}: the DoRA scale lora_magnitude_vector / ||W + s B A|| "
            "is not finite"
        )


def _fuse(modules: dict[tuple[int, str], LoraLinearWeights]) -> dict[tuple[int, str], FusedLoraGroup]:
    """Concatenate the A matrices of each layer's group members (in place: members become views)."""
    groups = {}
    layers = sorted({layer for layer, _ in modules})
    for layer in layers:
        for group, names in FUSED_GROUPS.items():
            present = [n for n in names if (layer, n) in modules]
            if not present:
                continue
            a_t = torch.cat([modules[(layer, n)].a_t for n in present], dim=1)
            members = []
            start = 0
            for name in present:
                weights = modules[(layer, name)]
                end = start + weights.a_t.shape[1]
                view = dataclasses.replace(weights, a_t=a_t[:, start:end])
                modules[(layer, name)] = view
                members.append(GroupMember(name, start, end, view))
                start = end
            groups[(layer, group)] = FusedLoraGroup(a_t, tuple(members))
    return groups


def apply_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    layer: int,
    module: str,
    segments: list[Segment],
    adapters: dict[int, ResidentAdapter],
) -> torch.Tensor:
    """Add each segment's LoRA delta to the base output, in place.

    Semantics:
        x: [N, in_features]   flattened tokens of the batch, grouped by adapter
        y: [N, out_features]  the base layer's output W x for the same tokens
        for each segment (start, end, slot) whose adapter targets (layer, module):
            y[start:end] = g * y[start:end] + (1 - g) * bias + x[start:end] @ A^T @ (s * g * B)^T
        with g = 1 for plain LoRA and DoRA's row scale otherwise (PEFT rescales W x, not the bias);
        rows in no segment are untouched.
    Returns y.
    """
    for segment in segments:
        weights = adapters[segment.adapter_slot].modules.get((layer, module))
        if weights is None:
            continue
        x_seg = x[segment.start : segment.end]
        y_seg = y[segment.start : segment.end]
        if weights.row_scale is not None:
            y_seg.mul_(weights.row_scale)
            if weights.bias_shift is not None:
                y_seg.add_(weights.bias_shift)
        y_seg.addmm_(x_seg @ weights.a_t, weights.b_t)
    return y


def apply_lora_group(
    outputs: dict[str, torch.Tensor],
    x: torch.Tensor,
    layer: int,
    group: str,
    segments: list[Segment],
    adapters: dict[int, ResidentAdapter],
) -> None:
    """:func:`apply_lora` for every member of a FUSED_GROUPS entry, with one A matmul per segment.

    Semantics:
        outputs: member module name -> y [N, out_features of that module], the base outputs (separate
                 tensors, or column views of one fused output: the deltas are added in place)
        x: [N, in_features], shared by every member
        for each segment (start, end, slot) and each member m the adapter targets in this layer:
            t = x[start:end] @ concat_m(A_m^T)                      [rows, sum of member ranks]
            y_m[start:end] = g_m * y_m[start:end] + (1 - g_m) * bias_m + t[:, ranks_m] @ (s * g_m * B_m)^T
        which equals apply_lora on each member separately.
    """
    for segment in segments:
        fused = adapters[segment.adapter_slot].groups.get((layer, group))
        if fused is None:
            continue
        t = x[segment.start : segment.end] @ fused.a_t
        for m in fused.members:
            y_seg = outputs[m.name][segment.start : segment.end]
            if m.weights.row_scale is not None:
                y_seg.mul_(m.weights.row_scale)
                if m.weights.bias_shift is not None:
                    y_seg.add_(m.weights.bias_shift)
            y_seg.addmm_(t[:, m.first : m.end], m.weights.b_t)
