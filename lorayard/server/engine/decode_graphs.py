"""A decode step in static shapes: batch-size buckets, padded input buffers, CUDA graph capture/replay.

A small model's decode step on a GPU is bound by launching its ops from Python (performance.md). A
CUDA graph records the step's kernels once and replays them with one launch, but only over fixed
shapes and fixed storage: so each step's rows are padded up to a bucket (1, 2, 4, 8, ... up to the
batch limit), its inputs are copied into buffers allocated once, and one graph per bucket replays
over them. A batch above the largest bucket runs eagerly, unpadded.

Three modes, one code path for the padding (so the CPU tests cover what the GPU replays):

- ``"eager"``: today's step, unpadded, on the caller's tensors.
- ``"static"``: padded to the bucket, the step run eagerly over the static buffers (any device; the
  CPU's tests of bucket and padding logic, and what ``torch.compile`` would see).
- ``"graph"``: as ``"static"``, but the step is captured in a ``torch.cuda.CUDAGraph`` per bucket on
  first use and replayed afterwards (CUDA only).

The step callable's contract, for ``"static"`` and ``"graph"``: it reads its inputs only from the
tensors it is given (views of the static buffers), launches the same ops whatever their values (no
host reads such as ``.item()`` or ``.tolist()``, no shapes that depend on values, e.g. attention
over a fixed key length or a fixed-width block table), keeps every tensor it reads from outside
(weights, KV cache, stacked LoRA) at a fixed address, and returns one tensor whose first dim is the
rows. Padded rows must be harmless: the pad values (a scratch KV slot, the stacked LoRA's zero row,
...) are the caller's to choose, per input. A bucket's first graph run also runs the step ``warmup``
times eagerly on the same inputs before capturing it, so the step must give the same result when
repeated (a decode step does: it rewrites the same K/V at the same positions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE  # what graph_pool_handle() returns

Mode = Literal["eager", "static", "graph"]
DecodeStep = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself (1, 2, 4, ..., 48 for 48)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    buckets = []
    size = 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch_size)


def bucket_for(batch_size: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds ``batch_size`` rows (``buckets`` ascending); None past the largest
    (the step then runs eagerly)."""
    for bucket in buckets:
        if bucket >= batch_size:
            return bucket
    return None


@dataclass(frozen=True)
class StaticInput:
    """One per-row input of the step: its buffer is ``[largest bucket, *shape]`` of ``dtype``; padded
    rows are filled with ``pad``."""

    dtype: torch.dtype
    pad: int | float
    shape: tuple[int, ...] = ()


class DecodeGraphs:
    """Runs a decode step padded to its batch-size bucket, replaying one CUDA graph per bucket."""

    def __init__(
        self,
        step: DecodeStep,
        inputs: Mapping[str, StaticInput],
        max_batch_size: int,
        *,
        device: torch.device | str,
        mode: Mode,
        buckets: Sequence[int] | None = None,
        warmup: int = 2,
        pool: _POOL_HANDLE | None = None,
    ) -> None:
        """buckets: ascending sizes (default :func:`batch_buckets` of ``max_batch_size``); warmup:
        eager runs of a bucket before its capture (cuBLAS and the allocator settle first); pool: a
        graph memory pool shared with other wrappers (``torch.cuda.graph_pool_handle()``), safe when
        their steps run one after another and each output is used before the next run of any of
        them (default: one pool of this wrapper's own)."""
        self.device = torch.device(device)
        if mode == "graph" and self.device.type != "cuda":
            raise ValueError(f"mode 'graph' needs a CUDA device, got {self.device}; use 'static' or 'eager'")
        self.step = step
        self.inputs = dict(inputs)
        self.mode: Mode = mode
        self.buckets = tuple(buckets) if buckets is not None else batch_buckets(max_batch_size)
        if list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be ascending positive sizes, got {self.buckets}")
        self.warmup = warmup
        largest = self.buckets[-1]
        self.buffers = {
            name: torch.full((largest, *spec.shape), spec.pad, dtype=spec.dtype, device=self.device)
            for name, spec in self.inputs.items()
        }
        """name -> [largest bucket, *shape]: the static storage every bucket's graph reads."""
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._shared_pool = pool
        self._pool: _POOL_HANDLE | None = pool
        self.last_bucket: int | None = None
        """The bucket the last :meth:`run` used (None: it ran eagerly), for tests and metrics."""

    @property
    def captured(self) -> tuple[int, ...]:
        """Buckets with a captured graph."""
        return tuple(sorted(self._graphs))

    def run(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """batch: input name -> [rows, *shape] (any device). Returns the step's output for the real rows,
        [rows, ...]; in ``"graph"`` mode a view of the graph's output buffer, valid until the next run."""
        if set(batch) != set(self.inputs):
            raise ValueError(f"the step takes inputs {sorted(self.inputs)}, got {sorted(batch)}")
        rows = {int(t.shape[0]) for t in batch.values()}
        if len(rows) != 1:
            raise ValueError(f"every input needs the same number of rows, got {sorted(rows)}")
        n = rows.pop()
        bucket = None if self.mode == "eager" else bucket_for(n, self.buckets)
        self.last_bucket = bucket
        if bucket is None:
            return self.step({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        for name, tensor in batch.items():
            buffer = self.buffers[name]
            buffer[:n].copy_(tensor, non_blocking=True)
            if bucket > n:
                buffer[n:bucket].fill_(self.inputs[name].pad)
        views = {name: buffer[:bucket] for name, buffer in self.buffers.items()}
        if self.mode == "static":
            return self.step(views)[:n]
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(views)
        graph, output = self._graphs[bucket]
        graph.replay()
        return output[:n]

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (smaller graphs then reuse the largest's memory
        pool), so no request pays for a capture; the buffers hold pad values meanwhile."""
        if self.mode != "graph":
            raise ValueError(f"capture needs mode 'graph', this wrapper runs {self.mode!r}")
        for bucket in reversed(self.buckets):
            if bucket not in self._graphs:
                for name, buffer in self.buffers.items():
                    buffer[:bucket].fill_(self.inputs[name].pad)
                self._graphs[bucket] = self._capture({k: b[:bucket] for k, b in self.buffers.items()})

    def reset(self) -> None:
        """Drop every graph (after the step's outside tensors moved, e.g. a reallocated KV cache)."""
        self._graphs.clear()
        self._pool = self._shared_pool

    def _capture(self, views: dict[str, torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream, as torch.cuda.graphs documents: lazy inits must not be captured.
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(views)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.step(views)
        return graph, output
