"""Our own forward pass for the decoder architectures of :mod:`lorayard.architectures`, over the paged
KV cache, with per-row LoRA.

One pass (:meth:`ModelRunner.forward`) runs the new tokens of several requests packed into one
``[T, hidden]`` batch: decode rows (one token each) and prompt chunks of any length, each request under
its own adapter, reading and writing K/V through its block table
(:mod:`lorayard.server.engine.paged_attention`).
Every linear runs once over the packed rows, so a burst of newcomers prefills in one pass instead of
one per request (chunked prefill in the vLLM/Sarathi manner).

The base's HF modules are *called* for every matmul (so bitsandbytes 4-bit/8-bit layers work
unchanged), for the embedding, the rotary embedding, the activation and every norm that is not plain
RMSNorm; attention (causal, sliding-window, soft-capped) and the cache are ours, and each linear's
output gets its rows' LoRA deltas from :mod:`lora_ops`. In bf16 on the CPU the engine's runner first
swaps the plain linears and the lm_head for prepacked twins (:mod:`prepacked_linear`). What differs
between architectures is read from their :class:`~lorayard.architectures.Architecture` spec; the
parity probe (:mod:`lorayard.server.engine.parity_probe`) checks the result against the HF forward at
startup.

Every op is a kernel launch, and a small model's decode step is launch-bound (on a GPU entirely so),
so the runner keeps the op count per layer low: on a GPU, unquantized q/k/v and gate/up are each one
matmul over a fused weight (the modules' own weights become views into it, so no memory is added);
rotary runs once over q and k together, RMSNorm is one fused op, and a decode step never waits on
the device before its logits (positions and slots are known on the host). On the CPU the linears
stay apart: one thread's GEMM over the concatenated gate/up weight measured 11-17% slower than
the two GEMMs it replaces (batch 16 and 64), and q/k/v gained nothing.

With a :class:`StaticDecode` (``--decode-mode static|graph``), a pass of decode rows only runs a
second form of the same decoder in shapes fixed by its batch-size bucket (:meth:`ModelRunner._static_step`):
inputs padded into the static buffers of :mod:`decode_graphs`, attention over block tables padded to
``max_model_len``, LoRA from the stacked buffers of :mod:`stacked_lora`; in mode graph each bucket's
step is captured once as a CUDA graph and replayed. What runs where and the step's contract:
docs/gpu.md.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lorayard.architectures import (
    architecture_for,
    head_dim,
    kv_heads,
    language_config,
    post_norm,
    sliding_window,
)
from lorayard.server.engine.block_pool import KVBlockStorage
from lorayard.server.engine.decode_graphs import DecodeGraphs, Mode, StaticInput, batch_buckets, bucket_for
from lorayard.server.engine.lora_ops import (
    FUSED_GROUPS,
    ResidentAdapter,
    Segment,
    apply_lora,
    apply_lora_group,
    segments_of,
)
from lorayard.server.engine.paged_attention import (
    LayerAttention,
    PagedBatch,
    fixed_decode_attention,
    fixed_decode_mask,
    paged_attention,
    write_kv,
)
from lorayard.server.engine.prepacked_linear import (
    PackedLinear,
    PrepackReport,
    prepack_available,
    prepack_modules,
    return_freed_pages,
)
from lorayard.server.engine.stacked_lora import ZERO_ROW, StackedLora, StackedLoraRefused, StackedRows

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE  # what graph_pool_handle() returns

log = logging.getLogger("lorayard.engine")

QKV = FUSED_GROUPS["qkv"]
GATE_UP = FUSED_GROUPS["gate_up"]


@dataclass(frozen=True)
class ImageEmbeds:
    """A row's image-pad tokens: what replaces their embeddings, and (Qwen3-VL) what the first
    decoder layers add to them."""

    at: torch.Tensor
    """[k] their indices among the row's ids (host, int64)."""
    embeds: torch.Tensor
    """[k, hidden] the vision tower's output for them."""
    deepstack: tuple[torch.Tensor, ...] = ()
    """Per early decoder layer i: [k, hidden] added to layer i's output at them (deepstack)."""


@dataclass(frozen=True)
class PassRow:
    """One request's new tokens in a forward pass: ``ids`` at positions ``start .. start + len(ids) - 1``,
    K/V read and written through ``blocks`` (its block table, covering every position up to the last)."""

    ids: list[int]
    start: int
    blocks: list[int]
    adapter_slot: int | None
    logits: Literal["last", "all", "none"] = "last"
    """Which of its positions need logits: the last (it samples), all (prompt logprobs), none (a
    prompt chunk before the last)."""
    mrope: torch.Tensor | None = None
    """A vision-language base's multimodal rotary positions of these tokens, [3, len(ids)] (t, h, w);
    None: ``start ..`` on all three axes (text only, no image before it)."""
    image_embeds: ImageEmbeds | None = None
    """Its image-pad tokens' embeddings from the vision tower; None: no image token in these ids."""


STACKED_R_MAX = 64
"""The stacked LoRA's rank bound (its buffers are padded to it): an adapter of a higher rank is not
stacked, and a decode pass holding it runs packed, with the segment path."""


@dataclass(frozen=True)
class StaticDecode:
    """How the runner runs a pass of decode rows only in static shapes (docs/gpu.md)."""

    mode: Mode
    """static (padded to a bucket, run eagerly) or graph (replayed as a CUDA graph per bucket)."""
    max_batch_size: int
    """The largest bucket: a bigger decode pass runs packed."""
    max_model_len: int
    """Every block table is padded to the blocks this many tokens need."""
    scratch_block: int
    """A KV block of the storage that no request owns: padded rows write their K/V there."""
    stack_capacity: int
    """Adapters the stacked LoRA holds at once (the engine's resident adapters at most)."""
    r_max: int = STACKED_R_MAX


class LoraDeltas(Protocol):
    """Adds every token's LoRA delta to a linear's output, in place; false when no token has one."""

    def __bool__(self) -> bool: ...

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, name: str) -> None: ...

    def apply_group(
        self, outputs: dict[str, torch.Tensor], x: torch.Tensor, layer: int, group: str
    ) -> None: ...


@dataclass(frozen=True)
class SegmentDeltas:
    """The packed pass's LoRA: one segment of rows per adapter (:mod:`lora_ops`)."""

    segments: list[Segment]
    adapters: dict[int, ResidentAdapter]

    def __bool__(self) -> bool:
        return bool(self.segments)

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, name: str) -> None:
        apply_lora(y, x, layer, name, self.segments, self.adapters)

    def apply_group(self, outputs: dict[str, torch.Tensor], x: torch.Tensor, layer: int, group: str) -> None:
        apply_lora_group(outputs, x, layer, group, self.segments, self.adapters)


@dataclass(frozen=True)
class StackedDeltas:
    """The static decode step's LoRA: each row's buffer row of the stack (:mod:`stacked_lora`), the
    same ops whatever the rows hold."""

    stack: StackedLora
    rows: StackedRows

    def __bool__(self) -> bool:
        return True

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, name: str) -> None:
        self.stack.apply(y, x, layer, name, self.rows)

    def apply_group(self, outputs: dict[str, torch.Tensor], x: torch.Tensor, layer: int, group: str) -> None:
        self.stack.apply_group(outputs, x, layer, group, self.rows)


NO_LORA = SegmentDeltas([], {})
"""No row has an adapter: every linear is the base's alone."""


def _adapter_order(adapter_slot: int | None) -> int:
    """Sort key that groups rows by adapter, the base's rows first."""
    return -1 if adapter_slot is None else adapter_slot


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def fuse_weights(modules: list[torch.nn.Module]) -> torch.Tensor | None:
    """Concatenate bias-free ``nn.Linear`` weights along the output dim and make each module's weight a
    view into the result, so one matmul computes every module's output; None if any module is not a
    plain bias-free Linear (quantized layers keep their own matmuls)."""
    linears = [m for m in modules if isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear]
    if len(linears) < len(modules) or any(m.bias is not None for m in linears):
        return None
    fused = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for module in linears:
        end = start + module.weight.shape[0]
        module.weight = torch.nn.Parameter(fused[start:end], requires_grad=False)
        start = end
    return fused


class ModelRunner:
    """Runs forward passes over references to the HF modules and the KV storage; owns the stacked LoRA
    and the static decode step's buffers and graphs when it has a static step."""

    def __init__(
        self,
        model: PreTrainedModel,
        storage: KVBlockStorage,
        fuse_linears: bool | None = None,
        static_decode: StaticDecode | None = None,
        prepack: bool = False,
    ) -> None:
        """fuse_linears: one matmul per q/k/v and gate/up group (default: on a GPU only);
        static_decode: run decode passes in static shapes (None: every pass is the packed one);
        prepack: replace the base's plain linears and lm_head by :class:`PackedLinear` where this CPU
        and dtype run them (:func:`prepack_available`), in the model itself: its HF forward still
        works, but it is the server's from then on (PEFT and training need the plain modules).

        Raises UnsupportedArchitecture for a base that :mod:`lorayard.architectures` does not list.
        """
        self.arch = architecture_for(model.config)
        config = language_config(model.config)  # a vision-language base's language model's
        self.model = model
        self.storage = storage
        self.block_size = storage.spec.block_size
        # The HF decoder blocks; what they hold differs by architecture (read through self.arch).
        self.layers: list[Any] = list(model.get_submodule(self.arch.layers_path).children())
        # The Llama family's embed_tokens, norm and rotary_emb (a vision-language base's language model).
        self.decoder: Any = model.get_submodule(self.arch.decoder_path) if self.arch.rotary else None
        self.linears: list[dict[str, torch.nn.Module]] = [
            {key: layer.get_submodule(path) for key, path in self.arch.linear_paths.items()}
            for layer in self.layers
        ]
        """Per layer: each targetable linear's key (the adapters' name for it) -> the module."""
        self.post_norm = post_norm(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = kv_heads(config)
        self.head_dim = head_dim(config)
        self.adapters: dict[int, ResidentAdapter] = {}
        self.device = next(model.parameters()).device
        n_layers = len(self.layers)
        self.windows = [sliding_window(model.config, i) for i in range(n_layers)]
        attention = "attn" if self.arch.family == "gpt2" else "self_attn"
        # GPT-2's includes scale_attn_weights and scale_attn_by_inverse_layer_idx; OPT scales q by it.
        self.scaling = [float(layer.get_submodule(attention).scaling) for layer in self.layers]
        self.attn_softcap: float | None = getattr(config, "attn_logit_softcapping", None)
        self.final_softcap: float | None = getattr(config, "final_logit_softcapping", None)
        layer_types: list[str] = list(getattr(config, "layer_types", None) or [])
        self.rope_keys: list[str | None] = (
            list(layer_types) if self.arch.rotary_per_layer_type else [None] * n_layers
        )
        self.fused_qkv: list[torch.Tensor | None] = [None] * n_layers
        self.fused_gate_up: list[torch.Tensor | None] = [None] * n_layers
        fuse = self.device.type == "cuda" if fuse_linears is None else fuse_linears
        if fuse and self.arch.fusable:  # Phi-3's and GPT-2's are fused already, OPT's are biased
            self.fused_qkv = [fuse_weights([getattr(x.self_attn, n) for n in QKV]) for x in self.layers]
            self.fused_gate_up = [fuse_weights([getattr(x.mlp, n) for n in GATE_UP]) for x in self.layers]
        self.prepacked = PrepackReport(0, 0)
        if prepack and prepack_available(model.dtype, self.device):
            self._prepack()
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6))
        self.static_decode = static_decode
        self.stack: StackedLora | None = None
        """Every stackable resident adapter, and which buffer row holds which slot (an adapter the
        stack refused or had no room for has no row: a decode pass holding one runs packed)."""
        self._stack_lock = threading.Lock()  # the registry loads adapters from worker threads
        self.graphs: dict[tuple[bool, int], DecodeGraphs] = {}
        """The static step's wrappers, made on first use, keyed by (whether the pass has a row with an
        adapter, its table width in blocks): a pass of base rows only skips the stack (whose masked
        matmuls read every resident adapter's weights), and a pass of short contexts gathers fewer
        keys than ``max_model_len``."""
        self._graph_pool: _POOL_HANDLE | None = None
        self.static_passes: collections.Counter[int] = collections.Counter()
        """Decode passes the static step ran, by bucket (for tests and benchmarks)."""
        if static_decode is not None:
            self._init_static(static_decode)

    def _prepack(self) -> None:
        """Swap the decoder's linears (those not fused into one weight) and the lm_head for packed
        twins, and re-read the per-layer module table."""
        layers = self.arch.layers_path
        paths = ["lm_head"]
        for i in range(len(self.layers)):
            fused = {*QKV} if self.fused_qkv[i] is not None else set()
            fused |= {*GATE_UP} if self.fused_gate_up[i] is not None else set()
            paths += [
                f"{layers}.{i}.{path}" for key, path in self.arch.linear_paths.items() if key not in fused
            ]
        tied = self.model.get_input_embeddings().weight
        self.prepacked = prepack_modules(self.model, paths, tied if isinstance(tied, torch.Tensor) else None)
        self.linears = [
            {key: layer.get_submodule(path) for key, path in self.arch.linear_paths.items()}
            for layer in self.layers
        ]
        return_freed_pages()  # the plain weights' last references were the old tables
        log.info(
            "%d linears run over prepacked %s weights (oneDNN); the tied lm_head's copy adds %.1f MB",
            self.prepacked.linears,
            self.model.dtype,
            self.prepacked.extra_bytes / 2**20,
        )

    def _init_static(self, static: StaticDecode) -> None:
        if self.stack is None:
            self.stack = StackedLora.from_config(
                self.model.config,
                static.stack_capacity,
                static.r_max,
                device=self.device,
                dtype=self.model.dtype,
            )
        self.table_width = math.ceil(static.max_model_len / self.block_size)
        self.width_buckets = batch_buckets(self.table_width)
        """Table widths in blocks (1, 2, 4, ... up to the widest, as the batch buckets): a pass's
        tables are padded to the smallest that holds its longest context."""
        if not 0 <= static.scratch_block < self.storage.num_blocks:
            raise ValueError(f"scratch block {static.scratch_block} is not in the KV storage")
        self._key_pos = torch.arange(self.table_width * self.block_size, device=self.device)
        """[widest table * block_size]: key positions; each step reads a prefix of it (a view at a
        fixed address)."""
        self.graphs = {}
        if static.mode == "graph":  # every wrapper's graphs share one memory pool (one pass at a time)
            self._graph_pool = torch.cuda.graph_pool_handle()

    def _wrapper(self, with_lora: bool, width: int) -> DecodeGraphs:
        """The static step's wrapper for passes with (or without) adapter rows and tables ``width``
        blocks wide, made on first use."""
        key = (with_lora, width)
        if key not in self.graphs:
            static = self.static_decode
            assert static is not None
            inputs = {
                "tokens": StaticInput(torch.long, pad=0),
                # A padded row sees one key (position 0 of the scratch block): never an all-masked row.
                "context_lens": StaticInput(torch.long, pad=1),
                "block_tables": StaticInput(torch.long, pad=static.scratch_block, shape=(width,)),
                "lora_rows": StaticInput(torch.long, pad=ZERO_ROW),
            }
            self.graphs[key] = DecodeGraphs(
                functools.partial(self._static_step, with_lora=with_lora),
                inputs,
                static.max_batch_size,
                device=self.device,
                mode=static.mode,
                pool=self._graph_pool,
            )
        return self.graphs[key]

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, slot: int, resident: ResidentAdapter) -> None:
        """Make an adapter resident under ``slot``, and stacked when the static step runs and the stack
        takes it (in place: captured graphs stay valid)."""
        self.adapters[slot] = resident
        if self.stack is None:
            return
        with self._stack_lock:
            try:
                self.stack.write(slot, resident)
            except StackedLoraRefused as exc:
                log.info("adapter %s decodes through the packed pass: %s", resident.key, exc)

    def remove_adapter(self, slot: int) -> None:
        self.adapters.pop(slot, None)
        with self._stack_lock:
            if self.stack is not None and self.stack.row_of(slot) is not None:
                self.stack.evict(slot)

    def over(self, storage: KVBlockStorage, max_model_len: int | None = None) -> ModelRunner:
        """This runner (same model, fused weights, adapters and stack) over other KV storage (the
        parity probe). With a static step, the copy gets its own over ``storage``, run eagerly
        (``"static"``: the graph's step without capturing it) for passes of up to ``max_model_len``
        tokens, with the storage's last block as its scratch block; None: every pass runs packed."""
        other = copy.copy(self)
        other.storage, other.block_size = storage, storage.spec.block_size
        other.graphs = {}  # this runner's steps read this runner's storage
        other._graph_pool = None
        other.static_passes = collections.Counter()
        if self.static_decode is not None and max_model_len is not None:
            other.static_decode = dataclasses.replace(
                self.static_decode,
                mode="static",
                max_model_len=max_model_len,
                scratch_block=storage.num_blocks - 1,
            )
            other._init_static(other.static_decode)
        return other

    # -- layers ---------------------------------------------------------------------------------
    def _linear(self, layer: int, name: str, x: torch.Tensor, lora: LoraDeltas) -> torch.Tensor:
        """Linear ``name`` (its key in the architecture's ``linear_paths``) of ``layer`` plus its rows'
        LoRA: x [N, in] -> [N, out]. GPT-2's Conv1D (a transposed weight) is called as itself."""
        y = self.linears[layer][name](x)
        if lora:
            lora.apply(y, x, layer, name)
        return y

    def _norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Plain RMSNorm as one fused op (HF's module is seven); any other norm is the module itself."""
        if not self.arch.plain_rms_norm:
            return module(x)
        eps = getattr(module, "variance_epsilon", None) or self.eps
        # torch types a Module's attributes as Tensor | Module; an RMSNorm's weight is a Parameter
        return F.rms_norm(x, (x.shape[-1],), module.weight, eps)  # type: ignore[arg-type]

    def _project_qkv(
        self, layer_index: int, x: torch.Tensor, lora: LoraDeltas
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, hidden] -> (qkv, q, k, v), LoRA applied: q [N, heads * hd], k, v [N, kv_heads * hd],
        column views of qkv [N, (heads + 2 kv_heads) * hd] when one matmul computed them (else None)."""
        heads, n_kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        sizes = (heads * hd, n_kv * hd, n_kv * hd)
        if self.arch.fused_projections or self.arch.family == "gpt2":
            # One linear (Phi-3's qkv_proj, GPT-2's c_attn): LoRA targets it as a whole (PEFT's layout).
            whole = self._linear(layer_index, "c_attn" if self.arch.family == "gpt2" else "qkv_proj", x, lora)
            return (whole, *whole.split(sizes, dim=-1))
        fused = self.fused_qkv[layer_index]
        qkv = None if fused is None else F.linear(x, fused)
        linears = self.linears[layer_index]
        q, k, v = (linears[name](x) for name in QKV) if qkv is None else qkv.split(sizes, dim=-1)
        if lora:  # members are separate tensors or column views of qkv: deltas land in place
            lora.apply_group(dict(zip(QKV, (q, k, v), strict=True)), x, layer_index, "qkv")
        return qkv, q, k, v

    def _qkv(
        self,
        layer_index: int,
        x: torch.Tensor,
        lora: LoraDeltas,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, hidden] -> q [N, heads, hd], k/v [N, kv_heads, hd] with rotary applied to q, k
        (``rope`` None: learned positions, already in x)."""
        n = x.shape[0]
        heads, kv_heads, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv, q, k, v = self._project_qkv(layer_index, x, lora)
        v = v.reshape(n, kv_heads, hd)
        if rope is None:
            return q.reshape(n, heads, hd), k.reshape(n, kv_heads, hd), v
        if self.arch.qk_norm:
            attn = self.layers[layer_index].self_attn
            q = self._norm(attn.q_norm, q.reshape(n, heads, hd))
            k = self._norm(attn.k_norm, k.reshape(n, kv_heads, hd))
            qk = torch.cat((q, k), dim=1)
        elif qkv is not None:  # q and k side by side already: a view, no copy
            qk = qkv[:, : (heads + kv_heads) * hd].view(n, heads + kv_heads, hd)
        else:
            qk = torch.cat((q.view(n, heads, hd), k.view(n, kv_heads, hd)), dim=1)
        # cos/sin: [N, 1, rotary dim], broadcast over heads; q and k rotate in one pass. A rotary dim
        # below hd (partial rotary) rotates the leading dims and passes the rest through, as HF does.
        cos, sin = rope
        rotary = cos.shape[-1]
        if rotary == hd:
            qk = qk * cos + _rotate_half(qk) * sin
        else:
            part = qk[..., :rotary]
            qk = torch.cat((part * cos + _rotate_half(part) * sin, qk[..., rotary:]), dim=-1)
        return qk[:, :heads], qk[:, heads:], v

    def _mlp(self, layer_index: int, x: torch.Tensor, lora: LoraDeltas) -> torch.Tensor:
        """x: [N, hidden] -> [N, hidden]: gated (Llama family) or up -> activation -> down."""
        layer = self.layers[layer_index]
        if self.arch.family == "gpt2":  # GELU (tanh) between c_fc and c_proj
            up = self._linear(layer_index, "c_fc", x, lora)
            return self._linear(layer_index, "mlp.c_proj", layer.mlp.act(up), lora)
        if self.arch.family == "opt":  # ReLU between fc1 and fc2
            up = self._linear(layer_index, "fc1", x, lora)
            return self._linear(layer_index, "fc2", layer.activation_fn(up), lora)
        mlp = layer.mlp
        if self.arch.fused_projections:
            gate, up = self._linear(layer_index, "gate_up_proj", x, lora).chunk(2, dim=-1)
            act = mlp.activation_fn
        else:
            fused = self.fused_gate_up[layer_index]
            if fused is not None:
                gate, up = F.linear(x, fused).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            if lora:
                lora.apply_group(dict(zip(GATE_UP, (gate, up), strict=True)), x, layer_index, "gate_up")
            act = mlp.act_fn
        return self._linear(layer_index, "down_proj", act(gate) * up, lora)

    def _block(
        self,
        i: int,
        h: torch.Tensor,
        lora: LoraDeltas,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """One decoder block: h [N, hidden] -> [N, hidden]; ``attend`` writes K/V and returns the
        attention output [N, heads * hd]."""
        layer = self.layers[i]
        if self.arch.family != "llama":
            return self._learned_position_block(i, h, lora, attend)
        q, k, v = self._qkv(i, self._norm(layer.input_layernorm, h), lora, rope)
        out = self._linear(i, "o_proj", attend(i, q, k, v), lora)
        if self.arch.sandwich_norms:
            h = h + self._norm(layer.post_attention_layernorm, out)
            mlp = self._mlp(i, self._norm(layer.pre_feedforward_layernorm, h), lora)
            return h + self._norm(layer.post_feedforward_layernorm, mlp)
        h = h + out
        return h + self._mlp(i, self._norm(layer.post_attention_layernorm, h), lora)

    def _learned_position_block(
        self,
        i: int,
        h: torch.Tensor,
        lora: LoraDeltas,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """A GPT-2 or OPT block, h [N, hidden] -> [N, hidden]: LayerNorms called as modules, before
        attention and MLP, or after each residual add for OPT with ``do_layer_norm_before=False``."""
        layer = self.layers[i]
        if self.arch.family == "gpt2":
            attn_norm, mlp_norm, out_name = layer.ln_1, layer.ln_2, "attn.c_proj"
        else:
            attn_norm, mlp_norm, out_name = layer.self_attn_layer_norm, layer.final_layer_norm, "out_proj"
        if self.post_norm:
            q, k, v = self._qkv(i, h, lora, None)
            h = attn_norm(h + self._linear(i, out_name, attend(i, q, k, v), lora))
            return mlp_norm(h + self._mlp(i, h, lora))
        q, k, v = self._qkv(i, attn_norm(h), lora, None)
        h = h + self._linear(i, out_name, attend(i, q, k, v), lora)
        return h + self._mlp(i, mlp_norm(h), lora)

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions: [N] -> h [N, hidden]: token embeddings (the module's own scale, Gemma's), plus
        learned position embeddings for GPT-2 and OPT (OPT's module adds its offset of 2), with OPT's
        ``project_in`` where the word embeddings are narrower than the decoder."""
        if self.arch.family == "gpt2":
            wte, wpe = (
                self.model.get_submodule("transformer.wte"),
                self.model.get_submodule("transformer.wpe"),
            )
            return wte(ids) + wpe(positions)
        if self.arch.family == "opt":
            decoder = self.model.model.decoder
            h = decoder.embed_tokens(ids)
            if decoder.project_in is not None:
                h = decoder.project_in(h)
            return h + decoder.embed_positions(None, position_ids=positions)
        return self.decoder.embed_tokens(ids)

    def _ropes(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> dict[str | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """positions: [N] (or a vision-language base's [3, N]: t, h, w) -> {layer type (None: all
        layers): (cos, sin) [N, 1, rotary dim]} in x's dtype; {None: None} for learned positions."""
        if not self.arch.rotary:
            return {None: None}
        if self.arch.vision:  # M-RoPE: the module picks each frequency band's axis (mrope_section)
            pos3 = positions.expand(3, -1) if positions.ndim == 1 else positions
            cos, sin = self.decoder.rotary_emb(x, pos3[:, None, :])
            return {None: (cos[0, :, None, :], sin[0, :, None, :])}
        ropes: dict[str | None, tuple[torch.Tensor, torch.Tensor] | None] = {}
        for key in dict.fromkeys(self.rope_keys):
            rotary = self.decoder.rotary_emb
            cos, sin = rotary(x, positions[None, :]) if key is None else rotary(x, positions[None, :], key)
            ropes[key] = (cos[0, :, None, :], sin[0, :, None, :])
        return ropes

    def _layer_attention(self, layer: int) -> LayerAttention:
        # Built per call from the lists: the parity-probe tests break one of them on purpose.
        return LayerAttention(self.scaling[layer], self.windows[layer], self.attn_softcap)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [N, hidden] -> float32 logits [N, vocab], soft-capped where the architecture does (Gemma 2)."""
        if self.arch.family == "gpt2":
            h = self.model.get_submodule("transformer.ln_f")(h)
        elif self.arch.family == "opt":  # post-norm OPT has no final norm; OPT-350m projects out to 512
            decoder = self.model.model.decoder
            if decoder.final_layer_norm is not None:
                h = decoder.final_layer_norm(h)
            if decoder.project_out is not None:
                h = decoder.project_out(h)
        else:
            h = self._norm(self.decoder.norm, h)
        logits = self.model.lm_head(h)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    # -- passes ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, rows: list[PassRow]) -> list[torch.Tensor | None]:
        """One forward pass over every row's new tokens, writing their K/V into the rows' blocks.

        Returns per row (in the order given) float32 logits: [1, vocab] for its last token, [len(ids),
        vocab] for every position with ``logits="all"`` (position i scores token i + 1), None with
        ``"none"``. Rows are packed grouped by adapter (one LoRA segment per adapter) and unpacked after.
        A pass of decode rows only runs the static step where :meth:`_static_batch` allows; with
        mode graph its logits are views of the graph's output, valid until the next pass.
        """
        static = self._static_batch(rows)
        if static is None:
            return self._packed_forward(rows)
        graphs = self._wrapper(bool(static["lora_rows"].any()), static["block_tables"].shape[1])
        try:
            logits = graphs.run(static)
        except Exception:
            if graphs.mode != "graph":
                raise
            # A step that cannot be captured (an op that syncs with the host, a layer that refuses
            # capture) must not fail requests: every later pass runs packed, which is exact.
            log.exception("capturing the decode step as a CUDA graph failed; decoding eagerly from now on")
            self.static_decode = None  # no wrapper is made again
            self.graphs = {}
            return self._packed_forward(rows)
        assert graphs.last_bucket is not None
        self.static_passes[graphs.last_bucket] += 1
        return [None if row.logits == "none" else logits[r : r + 1] for r, row in enumerate(rows)]

    def _packed_forward(self, rows: list[PassRow]) -> list[torch.Tensor | None]:
        order = sorted(range(len(rows)), key=lambda r: _adapter_order(rows[r].adapter_slot))
        packed = [rows[r] for r in order]
        lengths = [len(row.ids) for row in packed]
        batch = PagedBatch.build(
            [row.blocks for row in packed],
            [row.start + n for row, n in zip(packed, lengths, strict=True)],
            lengths,
            self.block_size,
            self.device,
        )
        lora = SegmentDeltas(segments_of([row.adapter_slot for row in packed], lengths), self.adapters)
        wanted: list[int] = []  # packed token rows whose logits are returned, row after row
        first = 0
        for row, n in zip(packed, lengths, strict=True):
            if row.logits == "all":
                wanted.extend(range(first, first + n))
            elif row.logits == "last":
                wanted.append(first + n - 1)
            first += n
        ids = torch.tensor([t for row in packed for t in row.ids]).to(self.device, non_blocking=True)
        h = self._embed(ids, batch.positions)
        positions = batch.positions
        deepstack: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.arch.vision:
            h, positions, deepstack = self._with_images(packed, lengths, h, positions)
        ropes = self._ropes(h, positions)
        heads, hd = self.num_heads, self.head_dim

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_cache, v_cache = self.storage.k[i], self.storage.v[i]
            write_kv(k_cache, v_cache, batch.slots, k, v)
            out = paged_attention(q, k_cache, v_cache, batch, self._layer_attention(i))
            return out.reshape(-1, heads * hd)

        for i in range(len(self.layers)):
            h = self._block(i, h, lora, ropes[self.rope_keys[i]], attend)
            if i < len(deepstack):  # Qwen3-VL: vision features added after the first layers
                at, features = deepstack[i]
                h[at] += features
        logits = self._logits(h[torch.tensor(wanted, device=self.device)]) if wanted else None
        results: list[torch.Tensor | None] = [None] * len(rows)
        taken = 0
        for r, row, n in zip(order, packed, lengths, strict=True):
            count = {"all": n, "last": 1, "none": 0}[row.logits]
            if count:
                assert logits is not None
                results[r] = logits[taken : taken + count]
                taken += count
        return results

    def _with_images(
        self, packed: list[PassRow], lengths: list[int], h: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """A vision-language pass's inputs: h [T, hidden] with each row's image embeddings in place of
        its image-pad tokens' embeddings; the [3, T] M-RoPE positions (a row without ``mrope`` has
        its sequence positions on all three axes); and per deepstack layer (packed index [k], the
        features [k, hidden]) to add after it."""
        pos3 = positions.expand(3, -1).clone()
        first = 0
        per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for row, n in zip(packed, lengths, strict=True):
            if row.mrope is not None:
                pos3[:, first : first + n] = row.mrope.to(self.device)
            images = row.image_embeds
            if images is not None:
                at = first + images.at.to(self.device)
                h[at] = images.embeds.to(h.device, h.dtype)
                for layer, features in enumerate(images.deepstack):
                    if layer == len(per_layer):
                        per_layer.append([])
                    per_layer[layer].append((at, features.to(h.device, h.dtype)))
            first += n
        deepstack = [
            (torch.cat([at for at, _ in parts]), torch.cat([f for _, f in parts])) for parts in per_layer
        ]
        return h, pos3, deepstack

    # -- the static decode step -------------------------------------------------------------------
    def _static_batch(self, rows: list[PassRow]) -> dict[str, torch.Tensor] | None:
        """The static step's inputs for a pass of decode rows only (host tensors, unpadded), or None
        when the pass runs packed: a prompt chunk in it, more rows than the largest bucket, an adapter
        the stack does not hold (DoRA, rank above r_max, the stack full), or no static step at all."""
        static = self.static_decode
        if static is None or len(rows) > static.max_batch_size or self.arch.vision:
            return None  # a vision-language row decodes at its M-RoPE offset: the packed pass has it
        if any(len(row.ids) != 1 for row in rows):
            return None
        lora_rows = []
        for row in rows:
            if row.adapter_slot is None:
                lora_rows.append(ZERO_ROW)
            elif self.stack is not None and (stacked := self.stack.row_of(row.adapter_slot)) is not None:
                lora_rows.append(stacked)
            else:
                return None
        used = [row.start // self.block_size + 1 for row in rows]  # blocks holding positions 0 .. start
        width = bucket_for(max(used), self.width_buckets)
        if width is None or any(len(row.blocks) < n for row, n in zip(rows, used, strict=True)):
            return None
        scratch = static.scratch_block
        tables = [[*row.blocks[:n], *[scratch] * (width - n)] for row, n in zip(rows, used, strict=True)]
        return {
            "tokens": torch.tensor([row.ids[0] for row in rows], dtype=torch.long),
            "context_lens": torch.tensor([row.start + 1 for row in rows], dtype=torch.long),
            "block_tables": torch.tensor(tables, dtype=torch.long),
            "lora_rows": torch.tensor(lora_rows, dtype=torch.long),
        }

    def _static_step(self, inputs: dict[str, torch.Tensor], *, with_lora: bool) -> torch.Tensor:
        """One decode token per row in shapes fixed by the bucket: -> float32 logits [B, vocab].

        inputs (the static buffers' views, B rows): tokens [B]; context_lens [B] (keys after this
        token: its position + 1); block_tables [B, W] (padded with the scratch block); lora_rows [B]
        (stacked buffer rows; read only ``with_lora``). Positions, write slots, the attention masks
        and the LoRA mask are computed here from them, on the device; nothing is read back to the
        host (docs/gpu.md, the step's contract)."""
        assert self.stack is not None
        tokens, context_lens = inputs["tokens"], inputs["context_lens"]
        tables = inputs["block_tables"]
        bs = self.block_size
        positions = context_lens - 1
        slots = tables.gather(1, (positions // bs)[:, None])[:, 0] * bs + positions % bs
        h = self._embed(tokens, positions)
        ropes = self._ropes(h, positions)
        key_pos = self._key_pos[: tables.shape[1] * bs]
        lora: LoraDeltas = NO_LORA
        if with_lora:
            lora = StackedDeltas(self.stack, self.stack.select(inputs["lora_rows"]))
        masks: dict[int | None, torch.Tensor] = {}
        heads, hd = self.num_heads, self.head_dim

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_cache, v_cache = self.storage.k[i], self.storage.v[i]
            write_kv(k_cache, v_cache, slots, k, v)
            window = self.windows[i]
            if window not in masks:
                masks[window] = fixed_decode_mask(key_pos, context_lens, window)
            out = fixed_decode_attention(q, k_cache, v_cache, tables, masks[window], self._layer_attention(i))
            return out.reshape(-1, heads * hd)

        for i in range(len(self.layers)):
            h = self._block(i, h, lora, ropes[self.rope_keys[i]], attend)
        return self._logits(h)

    def dense_weight(self, layer: int, name: str) -> torch.Tensor:
        """The base weight [out, in] of one linear, for DoRA's norm; refused for quantized layers."""
        module = self.linears[layer][name]
        if isinstance(module, PackedLinear):
            return module.dense_weight()
        if isinstance(module, Conv1D):  # GPT-2 stores [in, out]
            return module.weight.T
        if type(module) is not torch.nn.Linear:
            raise ValueError("DoRA adapters need an unquantized base")
        return module.weight

    def dense_bias(self, layer: int, name: str) -> torch.Tensor | None:
        """The bias [out] of one linear (None without one): DoRA leaves it out of its rescale."""
        bias = getattr(self.linears[layer][name], "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None
