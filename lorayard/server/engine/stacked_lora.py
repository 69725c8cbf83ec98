"""LoRA in a static shape: every resident adapter stacked in preallocated buffers, one row per adapter.

The segment path (:mod:`lora_ops`) launches two small matmuls per adapter present in a batch, in every
layer, from a Python loop whose length changes from step to step: fine for prefill, but a decode step
made of it cannot be captured in a CUDA graph, and on a launch-bound GPU its cost grows with the
number of distinct adapters. Here every resident adapter's A and B live in one buffer per layer and
linear, padded to ``r_max``, and each token carries the buffer row of its adapter (row 0: the zero
row, for tokens without one). The ops per linear are then fixed whatever the batch holds, and
writing or evicting an adapter overwrites its row in place: the buffers never move, so a captured
graph keeps reading the right storage.

Two ways to compute the delta from the stack (``method``; ``bench/stacked_lora.py`` measures both
against the segment path):

- ``"masked"``: one matmul of x with every row's A side by side, ``[N, rows * r_max]``, masked to each
  token's own block, then one matmul with every B stacked below each other. Three ops per linear
  (the A matmul and the mask are shared by a fused group), cost proportional to the buffer rows.
- ``"gather"``: each token's A and B gathered from the stack (index_select), then two batched matmuls
  (Punica's BGMV in torch ops). Cost proportional to the tokens; the gathers copy weights.

DoRA adapters are refused (:meth:`StackedLora.supports` is False): their row scale would add a
gather and a multiply to every linear for every adapter; a batch holding one uses the segment path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PretrainedConfig

from lorayard.architectures import language_config, linear_shapes
from lorayard.server.engine.lora_ops import FUSED_GROUPS, ResidentAdapter

Method = Literal["masked", "gather"]

ZERO_ROW = 0
"""The buffer row of tokens without an adapter: all zeros, never written."""


class StackedLoraRefused(ValueError):
    """The adapter cannot go into the stack (DoRA, rank above ``r_max``, no free row, a module the
    stack has no buffer for); the runner serves it through the segment path instead."""


@dataclass(frozen=True)
class StackedRows:
    """The per-token buffer rows of one step, prepared once for every linear of every layer.

    rows: [N] long, each token's buffer row (ZERO_ROW: no adapter).
    mask: [N, buffer rows * r_max] bool, true on each token's own block of A's columns (``"masked"``
          only; None for ``"gather"``).
    """

    rows: torch.Tensor
    mask: torch.Tensor | None


@dataclass(frozen=True)
class _Group:
    """The stacked buffers of the linears that read the same input in one layer (a FUSED_GROUPS entry,
    or a single linear as a group of one).

    a: [in_features, members, buffer rows, r_max]: member m's A^T of buffer row s is a[:, m, s].
    b: member name -> [buffer rows, r_max, out_features]: that member's (s * B)^T per buffer row.
    """

    members: tuple[str, ...]
    a: torch.Tensor
    b: dict[str, torch.Tensor]


class StackedLora:
    """Every resident adapter's LoRA, stacked per layer and linear, for a static-shape decode step.

    Semantics (for every layer l and targetable linear m, with ``rows`` a token's buffer row):
        y[n] += x[n] @ A_t[l, m, rows[n]] @ B_t[l, m, rows[n]]
    where A_t [in, r_max] and B_t [r_max, out] are the adapter's ``a_t`` / ``b_t`` (scaling folded into
    B, as :class:`~lorayard.server.engine.lora_ops.ResidentAdapter` holds them) zero-padded to r_max, and
    zero for buffer row 0, for untargeted linears and for layers the adapter leaves alone. This equals
    :func:`~lorayard.server.engine.lora_ops.apply_lora` for a batch of plain LoRA adapters.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        num_layers: int,
        capacity: int,
        r_max: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        method: Method = "masked",
    ) -> None:
        """shapes: linear short name -> (in_features, out_features), as
        :func:`lorayard.architectures.linear_shapes` gives them; capacity: how many adapters can be
        resident at once (the buffers hold capacity + 1 rows: row 0 is the zero row)."""
        if capacity < 1 or r_max < 1:
            raise ValueError(f"capacity and r_max must be at least 1, got {capacity} and {r_max}")
        self.shapes = dict(shapes)
        self.num_layers = num_layers
        self.capacity = capacity
        self.r_max = r_max
        self.device = torch.device(device)
        self.dtype = dtype
        self.method: Method = method
        self.buffer_rows = capacity + 1
        self.group_of: dict[str, str] = {}
        """Linear short name -> the group (FUSED_GROUPS key, or its own name) whose buffers hold it."""
        group_members: dict[str, tuple[str, ...]] = {}
        for group, names in FUSED_GROUPS.items():
            if all(n in shapes for n in names):
                group_members[group] = names
        for name in shapes:
            if not any(name in members for members in group_members.values()):
                group_members[name] = (name,)
        for group, members in group_members.items():
            if len({shapes[m][0] for m in members}) != 1:
                raise ValueError(f"the members of {group} read inputs of different sizes")
            for m in members:
                self.group_of[m] = group
        self.layers: list[dict[str, _Group]] = [
            {group: self._allocate(members) for group, members in group_members.items()}
            for _ in range(num_layers)
        ]
        # The one tracker of stacked rows, both directions (the model runner asks it, keeps no copy).
        self._slot_at: list[int | None] = [None] * self.buffer_rows
        """Buffer row -> the engine slot of the adapter written there (None: free; row 0 never used)."""
        self._row_of: dict[int, int] = {}
        """Engine slot -> its buffer row, for the adapters stacked."""
        # Which buffer row each of A's flattened columns belongs to: the mask is this == rows[:, None].
        self._column_rows = torch.arange(self.buffer_rows, device=self.device).repeat_interleave(r_max)

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        capacity: int,
        r_max: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        method: Method = "masked",
    ) -> StackedLora:
        """Buffers for every LoRA-targetable linear of ``config``'s architecture."""
        return cls(
            linear_shapes(config),
            language_config(config).num_hidden_layers,
            capacity,
            r_max,
            device=device,
            dtype=dtype,
            method=method,
        )

    def _allocate(self, members: tuple[str, ...]) -> _Group:
        in_features = self.shapes[members[0]][0]
        a = torch.zeros(
            in_features, len(members), self.buffer_rows, self.r_max, device=self.device, dtype=self.dtype
        )
        b = {
            m: torch.zeros(
                self.buffer_rows, self.r_max, self.shapes[m][1], device=self.device, dtype=self.dtype
            )
            for m in members
        }
        return _Group(members, a, b)

    @property
    def nbytes(self) -> int:
        return sum(
            g.a.nbytes + sum(b.nbytes for b in g.b.values()) for layer in self.layers for g in layer.values()
        )

    # -- residency --------------------------------------------------------------------------------
    def refusal(self, resident: ResidentAdapter) -> str | None:
        """Why ``resident`` cannot be stacked (None: it can), whatever rows are free."""
        for (layer, name), weights in resident.modules.items():
            if weights.row_scale is not None:
                return f"{resident.key} is a DoRA adapter; the stacked path serves plain LoRA only"
            if name not in self.shapes or not 0 <= layer < self.num_layers:
                return f"{resident.key} targets {name} of layer {layer}, which the stack has no buffer for"
            rank = weights.a_t.shape[1]
            if rank > self.r_max:
                return f"{resident.key} has rank {rank} in {name}, above the stack's r_max {self.r_max}"
            if tuple(weights.a_t.shape[:1]) + tuple(weights.b_t.shape[1:]) != self.shapes[name]:
                shape = (tuple(weights.a_t.shape), tuple(weights.b_t.shape))
                return f"{resident.key}'s {name} has A^T, B^T shapes {shape}, not {self.shapes[name]}"
            if not (torch.isfinite(weights.a_t).all() and torch.isfinite(weights.b_t).all()):
                # The masked method multiplies every token's masked-out columns (0) by every row's B:
                # one inf there is NaN in every token of the step, the base's included.
                return f"{resident.key}'s {name} holds NaN or inf; the stack is shared by every row"
        return None

    def supports(self, resident: ResidentAdapter) -> bool:
        """Whether ``resident`` can be stacked (a free row aside)."""
        return self.refusal(resident) is None

    def write(self, slot: int, resident: ResidentAdapter) -> int:
        """Copy ``resident`` (the engine's adapter ``slot``) into a free buffer row, in place; returns
        that row (1 .. capacity).

        Raises StackedLoraRefused (naming why) for an adapter the stack cannot hold or when every row
        is taken, ValueError when ``slot`` is stacked already."""
        if slot in self._row_of:
            raise ValueError(f"adapter slot {slot} is stacked already, in row {self._row_of[slot]}")
        reason = self.refusal(resident)
        if reason is not None:
            raise StackedLoraRefused(reason)
        free = [row for row in range(1, self.buffer_rows) if self._slot_at[row] is None]
        if not free:
            raise StackedLoraRefused(f"all {self.capacity} stacked rows are taken; evict one first")
        row = free[0]
        self._clear(row)
        for (layer, name), weights in resident.modules.items():
            group = self.layers[layer][self.group_of[name]]
            rank = weights.a_t.shape[1]
            member = group.members.index(name)
            group.a[:, member, row, :rank].copy_(weights.a_t)
            group.b[name][row, :rank].copy_(weights.b_t)
        self._slot_at[row], self._row_of[slot] = slot, row
        return row

    def evict(self, slot: int) -> None:
        """Free the row of adapter ``slot`` and zero it in place (a token still pointing at it would
        add nothing)."""
        row = self._row_of.pop(slot, None)
        if row is None:
            raise ValueError(f"adapter slot {slot} is not stacked")
        self._clear(row)
        self._slot_at[row] = None

    def row_of(self, slot: int) -> int | None:
        """The buffer row of adapter ``slot``; None when it is not stacked (refused, or no room)."""
        return self._row_of.get(slot)

    def slot_at(self, row: int) -> int | None:
        """The adapter slot whose weights buffer ``row`` holds; None for a free row or the zero row."""
        return self._slot_at[row]

    def _clear(self, row: int) -> None:
        for layer in self.layers:
            for group in layer.values():
                group.a[:, :, row].zero_()
                for b in group.b.values():
                    b[row].zero_()

    # -- compute ----------------------------------------------------------------------------------
    def select(self, rows: torch.Tensor) -> StackedRows:
        """rows: [N] long, each token's buffer row -> what :meth:`apply` needs, computed once per step
        (for ``"masked"`` the column mask, shared by every linear of every layer)."""
        if self.method == "gather":
            return StackedRows(rows, None)
        return StackedRows(rows, self._column_rows[None, :] == rows[:, None])

    def apply(
        self, y: torch.Tensor, x: torch.Tensor, layer: int, name: str, rows: StackedRows
    ) -> torch.Tensor:
        """Add every token's LoRA delta of linear ``name`` in ``layer`` to y, in place.

        x: [N, in_features]; y: [N, out_features] (the base output; a column view is fine).
        Returns y.
        """
        group = self.layers[layer][self.group_of[name]]
        self._apply_members(group, {name: y}, x, rows)
        return y

    def apply_group(
        self, outputs: dict[str, torch.Tensor], x: torch.Tensor, layer: int, group: str, rows: StackedRows
    ) -> None:
        """:meth:`apply` for every member of a FUSED_GROUPS entry, with one A matmul for all of them.

        outputs: member name -> y [N, out_features of that member] (separate tensors or column views of
        one fused output); x: [N, in_features], shared by every member.
        """
        self._apply_members(self.layers[layer][group], outputs, x, rows)

    def _apply_members(
        self, group: _Group, outputs: dict[str, torch.Tensor], x: torch.Tensor, rows: StackedRows
    ) -> None:
        n_members = len(group.members)
        in_features = group.a.shape[0]
        if rows.mask is not None:
            # t: [N, members, buffer rows * r_max], every row's x @ A^T for every member at once
            # Masked by selection, not by multiplying by 0: a token whose x is inf or NaN (its own
            # adapter's doing) keeps its NaN in its own row, never in another row's columns.
            t = (x @ group.a.view(in_features, -1)).view(x.shape[0], n_members, -1)
            t = torch.where(rows.mask[:, None], t, 0.0)
            for m, name in enumerate(group.members):
                if name in outputs:
                    outputs[name].addmm_(t[:, m], group.b[name].view(-1, group.b[name].shape[-1]))
            return
        # a_rows: [N, in, members * r_max], each token's own A^T of every member
        a_rows = group.a.permute(2, 0, 1, 3).index_select(0, rows.rows).view(x.shape[0], in_features, -1)
        t = torch.bmm(x[:, None, :], a_rows)  # [N, 1, members * r_max]
        r = self.r_max
        for m, name in enumerate(group.members):
            if name in outputs:
                b_rows = group.b[name].index_select(0, rows.rows)  # [N, r_max, out]
                outputs[name].add_(torch.bmm(t[:, :, m * r : (m + 1) * r], b_rows)[:, 0])
