"""The base's linears over prepacked weights on the CPU (issue 30): oneDNN's blocked layout, in bf16.

A plain ``F.linear`` in bf16 reorders its weight into oneDNN's blocked layout on every call; at one
row that reorder costs more than the matmul, so bf16 lost to float32 at batch 1. Reordering once at
load (what inductor's ``freezing`` and vLLM's CPU build do) makes bf16 faster at every pass shape:
per ``F.linear`` of SmolLM2's shapes on one thread, 576x576 at 1 row 57 -> 27 us, 1536x576 at 16 rows
151 -> 86 us, the 49k-wide lm_head at 1 row 8.9 -> 5.8 ms (docs/performance.md, issue 30).

Semantics: ``PackedLinear(x) == F.linear(x, W, b)`` for x [..., in] -> [..., out], bit for bit in
bf16 (checked at load by :func:`prepack_available`, and per architecture by the tests); the packed
tensor REPLACES ``W`` (the module that held it is dropped), so memory does not grow, except for a
tied lm_head whose matrix the input embedding still needs for its lookup (SmolLM2: 54 MiB).

Only bf16 is packed. float32 stays ``F.linear``: MKL's packed sgemm (``torch.ops.mkl``) is used only
by passes of exactly the row count it was packed for, and reads the original weight for any other,
so both must stay (twice the weights' memory; the pack is about the weight's size) for a gain at one
row count: 1.15x a 16-row decode step, nothing at 1 row or in prefill (bench/issue30_ab.py).
oneDNN's float32 packed path is slower at one row and not bit-identical to ``F.linear``, and
float32's promise is token identity with HF/PEFT.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

log = logging.getLogger("lorayard.engine")

PACKED_DTYPES = frozenset({torch.bfloat16})
"""The weight dtypes packed (float32's reasons against: the module docstring)."""
ROWS_HINT = 16
"""The row count oneDNN picks its blocked layout for (the CPU's default batch); any row count runs on
the result, and the hint changed timings by a few percent at most."""


def _linear_pointwise(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def prepack_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this torch and CPU run prepacked linears in ``dtype`` on ``device``: a CPU device, a
    packed dtype, oneDNN built in with native bf16 support, and a small packed linear equal to
    ``F.linear`` (checked here, once, so a torch whose private ops changed falls back, not fails)."""
    if device.type != "cpu" or dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=gen).to(dtype)
        x = torch.randn(3, 40, generator=gen).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
        return torch.equal(_linear_pointwise(x, packed, None), F.linear(x, weight))
    except (RuntimeError, AttributeError) as exc:  # an op missing or refusing this build or CPU
        log.info("prepacked linears unavailable (%s); the base's linears run F.linear", exc)
        return False


class PackedLinear(torch.nn.Module):
    """A bias-optional linear over a weight in oneDNN's blocked layout: x [..., in] -> [..., out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """weight [out, in] (dense; packed here, and not kept), bias [out] or None."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        with torch.no_grad():
            # An opaque mkldnn tensor: a plain attribute, not a buffer (nothing may .to() or save it).
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), ROWS_HINT)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def of(cls, module: torch.nn.Module) -> PackedLinear | None:
        """The packed twin of a plain ``nn.Linear`` or GPT-2 ``Conv1D`` (weight [in, out]) in a packed
        dtype; None for anything else (bitsandbytes' quantized layers, float32)."""
        if type(module) is torch.nn.Linear:
            weight = module.weight
        elif type(module) is Conv1D:
            weight = module.weight.T
        else:
            return None
        if weight.dtype not in PACKED_DTYPES:
            return None
        bias = module.bias if isinstance(module.bias, torch.Tensor) else None
        return cls(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear_pointwise(x, self.packed, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """W [out, in], recovered from the packed copy (DoRA's norm needs it at adapter load): the
        identity's rows through the linear, each output one product with 1 (exact in any dtype)."""
        with torch.no_grad():
            eye = torch.eye(self.in_features, dtype=self.dtype)
            return _linear_pointwise(eye, self.packed, None).T.contiguous()

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


@dataclass(frozen=True)
class PrepackReport:
    linears: int
    """Linears now running over packed weights."""
    extra_bytes: int
    """Bytes packing added: a tied lm_head's copy (its matrix stays as the input embedding)."""


def prepack_modules(root: torch.nn.Module, paths: list[str], tied: torch.Tensor | None) -> PrepackReport:
    """Replace each module at ``paths`` under ``root`` that :meth:`PackedLinear.of` takes by its packed
    twin, in place (the original module and weight are dropped); ``tied``: the input embedding's
    weight, whose storage a tied lm_head shares (its packed copy is then extra memory)."""
    packed = extra = 0
    for path in paths:
        module = root.get_submodule(path)
        twin = PackedLinear.of(module)
        if twin is None:
            continue
        weight = module.weight  # PackedLinear.of took it: a Linear's or Conv1D's tensor
        assert isinstance(weight, torch.Tensor)
        if tied is not None and weight.untyped_storage().data_ptr() == tied.untyped_storage().data_ptr():
            extra += weight.numel() * weight.element_size()
        root.set_submodule(path, twin)
        packed += 1
    return PrepackReport(packed, extra)


def return_freed_pages() -> None:
    """Hand freed heap pages back to the OS, once the last reference to the plain weights (the
    caller's module tables) is gone. glibc keeps freed heap memory for reuse:
    after packing SmolLM2 in bf16 the process's RSS stayed 275 MiB higher (the old weights' size)
    though nothing referenced them; after ``malloc_trim`` it is the tied lm_head's 54 MiB copy plus
    a few MiB. A no-op where the C library has no ``malloc_trim`` (musl, macOS)."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)
