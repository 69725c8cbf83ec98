"""The engine's KV cache: one preallocated slot per running request, sized from a memory budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CPU_BUDGET_GB = 4.0
"""KV budget when none is given on the CPU; on a GPU we take a share of free memory instead."""


@dataclass(frozen=True)
class KVCacheSpec:
    layers: int
    kv_heads: int
    head_dim: int
    max_model_len: int
    dtype: torch.dtype

    @property
    def bytes_per_slot(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.max_model_len * self.head_dim * element


def slots_for_budget(spec: KVCacheSpec, wanted: int, budget_gb: float | None, device: str) -> int:
    """As many slots as wanted, fewer if the budget does not hold them (at least one)."""
    if budget_gb is None:
        if device.startswith("cuda") and torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            budget_gb = 0.8 * free / 2**30
        else:
            budget_gb = DEFAULT_CPU_BUDGET_GB
    fit = int(budget_gb * 2**30 // spec.bytes_per_slot)
    return max(1, min(wanted, fit))


class KVCache:
    """k[layer], v[layer]: [slots, kv_heads, max_model_len, head_dim]; a slot per running request."""

    def __init__(self, spec: KVCacheSpec, slots: int, device: str) -> None:
        self.spec = spec
        self.slots = slots
        shape = (slots, spec.kv_heads, spec.max_model_len, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.layers)]
        self.v = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.layers)]
        self._free = list(range(slots - 1, -1, -1))
        self.lengths = [0] * slots
        """Tokens cached per slot: what the usage gauge reports."""

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.append(slot)

    def usage(self) -> float:
        return sum(self.lengths) / (self.slots * self.spec.max_model_len)
