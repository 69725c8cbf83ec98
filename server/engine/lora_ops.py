"""Heterogeneous LoRA in one forward pass: every row of a batch applies its own adapter.

Rows are kept sorted by adapter so each adapter's rows form one contiguous segment (LoRAX's idea);
for each segment the delta is two small matmuls on views of the activations, so rows without an
adapter cost nothing and adapters of different ranks and target modules mix freely. Base weights
are never merged or modified.
"""

from __future__ import annotations

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
    scale) folded in; row_scale: DoRA's ``g = m / ||W + s B A||`` per output feature, or None.
    """

    a_t: torch.Tensor
    b_t: torch.Tensor
    row_scale: torch.Tensor | None = None


class ResidentAdapter:
    """An adapter's weights in engine memory, indexed by (layer, module short name)."""

    def __init__(self, key: str, modules: dict[tuple[int, str], LoraLinearWeights]) -> None:
        self.key = key
        self.modules = modules

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
    ) -> ResidentAdapter:
        """Fold scaling into B; for DoRA compute the row scale from the dense base weight once."""
        modules = {}
        for key_, module in weights.modules.items():
            a = module.a.to(device=device, dtype=torch.float32)
            b = module.b.to(device=device, dtype=torch.float32)
            row_scale = None
            b_t = (b * module.scaling).T
            if module.magnitude is not None:
                if base_weight is None or key_ not in base_weight:
                    raise ValueError("DoRA needs the dense base weight")
                w = base_weight[key_].to(device=device, dtype=torch.float32)
                norm = torch.linalg.norm(w + module.scaling * (b @ a), dim=1)
                row_scale = module.magnitude.to(device=device, dtype=torch.float32) / norm
                b_t = b_t * row_scale[None, :]
            modules[key_] = LoraLinearWeights(
                a_t=a.T.contiguous().to(dtype),
                b_t=b_t.contiguous().to(dtype),
                row_scale=None if row_scale is None else row_scale.to(dtype),
            )
        return cls(key, modules)


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
            y[start:end] = g * y[start:end] + x[start:end] @ A^T @ (s * g * B)^T
        with g = 1 for plain LoRA and DoRA's row scale otherwise; rows in no segment are untouched.
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
        y_seg.addmm_(x_seg @ weights.a_t, weights.b_t)
    return y
