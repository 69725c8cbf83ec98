"""Our own forward pass for the decoder architectures of :mod:`lorayard.architectures`, over our KV
cache, with per-row LoRA.

The base's HF modules are *called* for every matmul (so bitsandbytes 4-bit/8-bit layers work
unchanged), for the embedding, the rotary embedding, the activation and every norm that is not plain
RMSNorm; attention (causal, sliding-window, soft-capped) and the cache are ours, and each linear's
output gets its rows' LoRA deltas from :mod:`lora_ops`. What differs between architectures is read
from their :class:`~lorayard.architectures.Architecture` spec; the parity probe
(:mod:`server.engine.parity_probe`) checks the result against the HF forward at startup.

Every op is a kernel launch, and a small model's decode step is launch-bound (on a GPU entirely so),
so the runner keeps the op count per layer low: on a GPU, unquantized q/k/v and gate/up are each one
matmul over a fused weight (the modules' own weights become views into it, so no memory is added);
rotary runs once over q and k together, RMSNorm is one fused op, and a decode step never waits on
the device before its logits (positions and slots are known on the host). On the CPU the linears
stay apart: one thread's GEMM over the concatenated gate/up weight measured 11-17% slower than
the two GEMMs it replaces (batch 16 and 64), and q/k/v gained nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from lorayard.architectures import architecture_for, head_dim, sliding_window
from server.engine.kv_cache import KVCache
from server.engine.lora_ops import FUSED_GROUPS, ResidentAdapter, Segment, apply_lora, apply_lora_group

QKV = FUSED_GROUPS["qkv"]
GATE_UP = FUSED_GROUPS["gate_up"]


@dataclass(frozen=True)
class PrefillRow:
    """A chunk of one request's prompt: ``ids`` at positions ``start .. start + len(ids) - 1``."""

    slot: int
    ids: list[int]
    start: int
    adapter_slot: int | None


@dataclass(frozen=True)
class DecodeBatch:
    """One new token per row: row r writes ``tokens[r]`` at ``positions[r]`` of cache slot ``slots[r]``.

    Rows are grouped by adapter (``segments``). Plain lists: the runner moves them to the device in
    one copy and never reads device memory back to plan the step.
    """

    slots: list[int]
    positions: list[int]
    tokens: list[int]
    segments: list[Segment]


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
    """Runs prefill chunks and batched decode steps; owns nothing but references to the HF modules."""

    def __init__(self, model: PreTrainedModel, cache: KVCache, fuse_linears: bool | None = None) -> None:
        """fuse_linears: one matmul per q/k/v and gate/up group (default: on a GPU only).

        Raises UnsupportedArchitecture for a base that :mod:`lorayard.architectures` does not list.
        """
        config = model.config
        self.arch = architecture_for(config)
        self.model = model
        self.cache = cache
        decoder = model.model
        self.layers = decoder.layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.adapters: dict[int, ResidentAdapter] = {}
        self.device = next(model.parameters()).device
        n_layers = len(self.layers)
        self.windows = [sliding_window(config, i) for i in range(n_layers)]
        self.scaling = [float(layer.self_attn.scaling) for layer in self.layers]
        self.attn_softcap: float | None = getattr(config, "attn_logit_softcapping", None)
        self.final_softcap: float | None = getattr(config, "final_logit_softcapping", None)
        layer_types: list[str] = list(getattr(config, "layer_types", None) or [])
        self.rope_keys: list[str | None] = (
            list(layer_types) if self.arch.rotary_per_layer_type else [None] * n_layers
        )
        self.fused_qkv: list[torch.Tensor | None] = [None] * n_layers
        self.fused_gate_up: list[torch.Tensor | None] = [None] * n_layers
        fuse = self.device.type == "cuda" if fuse_linears is None else fuse_linears
        if fuse and not self.arch.fused_projections:  # Phi-3's linears are fused already
            self.fused_qkv = [fuse_weights([getattr(x.self_attn, n) for n in QKV]) for x in self.layers]
            self.fused_gate_up = [fuse_weights([getattr(x.mlp, n) for n in GATE_UP]) for x in self.layers]
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6))

    # -- layers ---------------------------------------------------------------------------------
    def _linear(
        self, module: torch.nn.Module, x: torch.Tensor, layer: int, name: str, segments: list[Segment]
    ) -> torch.Tensor:
        y = module(x)
        if segments:
            apply_lora(y, x, layer, name, segments, self.adapters)
        return y

    def _norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Plain RMSNorm as one fused op (HF's module is seven); any other norm is the module itself."""
        if not self.arch.plain_rms_norm:
            return module(x)
        eps = getattr(module, "variance_epsilon", None) or self.eps
        # torch types a Module's attributes as Tensor | Module; an RMSNorm's weight is a Parameter
        return F.rms_norm(x, (x.shape[-1],), module.weight, eps)  # type: ignore[arg-type]

    def _project_qkv(
        self, layer_index: int, x: torch.Tensor, segments: list[Segment]
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, hidden] -> (qkv, q, k, v), LoRA applied: q [N, heads * hd], k, v [N, kv_heads * hd],
        column views of qkv [N, (heads + 2 kv_heads) * hd] when one matmul computed them (else None)."""
        heads, kv_heads, hd = self.num_heads, self.num_kv_heads, self.head_dim
        attn = self.layers[layer_index].self_attn
        sizes = (heads * hd, kv_heads * hd, kv_heads * hd)
        if self.arch.fused_projections:  # LoRA targets the fused module as a whole (PEFT's layout)
            whole = self._linear(attn.qkv_proj, x, layer_index, "qkv_proj", segments)
            return (whole, *whole.split(sizes, dim=-1))
        fused = self.fused_qkv[layer_index]
        qkv = None if fused is None else F.linear(x, fused)
        q, k, v = (getattr(attn, name)(x) for name in QKV) if qkv is None else qkv.split(sizes, dim=-1)
        if segments:  # members are separate tensors or column views of qkv: deltas land in place
            outputs = dict(zip(QKV, (q, k, v), strict=True))
            apply_lora_group(outputs, x, layer_index, "qkv", segments, self.adapters)
        return qkv, q, k, v

    def _qkv(
        self,
        layer_index: int,
        x: torch.Tensor,
        segments: list[Segment],
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, hidden] -> q [N, heads, hd], k/v [N, kv_heads, hd] with rotary applied to q, k."""
        n = x.shape[0]
        heads, kv_heads, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv, q, k, v = self._project_qkv(layer_index, x, segments)
        v = v.reshape(n, kv_heads, hd)
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

    def _mlp(self, layer_index: int, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        mlp = self.layers[layer_index].mlp
        if self.arch.fused_projections:
            gate, up = self._linear(mlp.gate_up_proj, x, layer_index, "gate_up_proj", segments).chunk(
                2, dim=-1
            )
            act = mlp.activation_fn
        else:
            fused = self.fused_gate_up[layer_index]
            if fused is not None:
                gate, up = F.linear(x, fused).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            if segments:
                outputs = dict(zip(GATE_UP, (gate, up), strict=True))
                apply_lora_group(outputs, x, layer_index, "gate_up", segments, self.adapters)
            act = mlp.act_fn
        return self._linear(mlp.down_proj, act(gate) * up, layer_index, "down_proj", segments)

    def _block(
        self,
        i: int,
        h: torch.Tensor,
        segments: list[Segment],
        rope: tuple[torch.Tensor, torch.Tensor],
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """One decoder block: h [N, hidden] -> [N, hidden]; ``attend`` writes K/V and returns the
        attention output [N, heads * hd]."""
        layer = self.layers[i]
        q, k, v = self._qkv(i, self._norm(layer.input_layernorm, h), segments, rope)
        out = self._linear(layer.self_attn.o_proj, attend(i, q, k, v), i, "o_proj", segments)
        if self.arch.sandwich_norms:
            h = h + self._norm(layer.post_attention_layernorm, out)
            mlp = self._mlp(i, self._norm(layer.pre_feedforward_layernorm, h), segments)
            return h + self._norm(layer.post_feedforward_layernorm, mlp)
        h = h + out
        return h + self._mlp(i, self._norm(layer.post_attention_layernorm, h), segments)

    def _ropes(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        """positions: [N] -> {layer type (None: all layers): (cos, sin) [N, 1, rotary dim]} in x's dtype."""
        ropes = {}
        for key in dict.fromkeys(self.rope_keys):
            rotary = self.model.model.rotary_emb
            cos, sin = rotary(x, positions[None, :]) if key is None else rotary(x, positions[None, :], key)
            ropes[key] = (cos[0, :, None, :], sin[0, :, None, :])
        return ropes

    def _masks(
        self, visible: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor
    ) -> dict[int | None, torch.Tensor]:
        """{window (None: full): mask}; ``visible`` is the causal mask, keys/positions broadcast like it."""
        masks: dict[int | None, torch.Tensor] = {None: visible}
        for window in {w for w in self.windows if w is not None}:
            masks[window] = visible & (keys > positions - window)
        return masks

    def _attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        layer: int,
        gqa: bool,
    ) -> torch.Tensor:
        """SDPA, or for soft-capped logits (Gemma 2, which SDPA cannot do) the same math written out."""
        scale = self.scaling[layer]
        if self.attn_softcap is None:
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        if gqa:
            group = q.shape[-3] // keys.shape[-3]
            keys, values = keys.repeat_interleave(group, dim=-3), values.repeat_interleave(group, dim=-3)
        scores = (q @ keys.transpose(-1, -2)) * scale
        scores = torch.tanh(scores / self.attn_softcap) * self.attn_softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [N, hidden] -> float32 logits [N, vocab], soft-capped where the architecture does (Gemma 2)."""
        logits = self.model.lm_head(self._norm(self.model.model.norm, h))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    # -- passes ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, row: PrefillRow, all_positions: bool = False) -> torch.Tensor:
        """Run one prompt chunk, writing its K/V into the row's slot.

        Returns float32 logits [1, vocab] for the chunk's last token, or [len(ids), vocab] for every
        position with ``all_positions`` (prompt logprobs: position i scores token i + 1).
        """
        t = len(row.ids)
        end = row.start + t
        ids = torch.tensor(row.ids, device=self.device)
        positions = torch.arange(row.start, end, device=self.device)
        segments = [] if row.adapter_slot is None else [Segment(0, t, row.adapter_slot)]
        h = self.model.model.embed_tokens(ids)
        ropes = self._ropes(h, positions)
        # Causal over the cached prefix plus this chunk: query i sees keys 0 .. start + i (the last
        # `window` of them in a sliding-window layer).
        keys_at = torch.arange(end, device=self.device)[None, :]
        masks = self._masks(keys_at <= positions[:, None], keys_at, positions[:, None])

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.cache.k[i][row.slot, :, row.start : end] = k.transpose(0, 1)
            self.cache.v[i][row.slot, :, row.start : end] = v.transpose(0, 1)
            keys = self.cache.k[i][row.slot, :, :end]
            values = self.cache.v[i][row.slot, :, :end]
            out = self._attention(
                q.transpose(0, 1)[None], keys[None], values[None], masks[self.windows[i]], i, gqa=True
            )  # [1, heads, t, hd]
            return out[0].transpose(0, 1).reshape(t, self.num_heads * self.head_dim)

        for i in range(len(self.layers)):
            h = self._block(i, h, segments, ropes[self.rope_keys[i]], attend)
        self.cache.lengths[row.slot] = end
        return self._logits(h if all_positions else h[-1:])

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One token for each row; K/V appended at each row's position. Returns logits [B, vocab]."""
        b = len(batch.tokens)
        length = max(batch.positions) + 1
        # Rows are ordered by adapter, not by slot. When the rows' slots are one contiguous range
        # (a full or freshly filled batch), attention reads that range of the cache as a view, with
        # queries permuted into slot order, instead of gathering a copy of every row's K/V per layer.
        by_slot = sorted(range(b), key=batch.slots.__getitem__)
        first = batch.slots[by_slot[0]]
        contiguous = batch.slots[by_slot[-1]] - first + 1 == b
        unsort = sorted(range(b), key=by_slot.__getitem__)
        host = torch.tensor([batch.tokens, batch.positions, batch.slots, by_slot, unsort])
        tokens, positions, slots, by_slot_t, unsort_t = host.to(self.device, non_blocking=True)
        h = self.model.model.embed_tokens(tokens)
        ropes = self._ropes(h, positions)
        # Row r sees keys 0 .. positions[r] (the last `window` in a sliding layer); slots are padded
        # to the longest row.
        keys_at = torch.arange(length, device=self.device)[None, :]
        masks = {
            w: m[:, None, None, :]
            for w, m in self._masks(keys_at <= positions[:, None], keys_at, positions[:, None]).items()
        }
        if contiguous:
            masks = {w: m[by_slot_t] for w, m in masks.items()}
        grouped = (b, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.cache.k[i][slots, :, positions] = k
            self.cache.v[i][slots, :, positions] = v
            mask = masks[self.windows[i]]
            # One query per row: each KV head's query heads stand in for the query-length axis, so
            # attention needs no GQA expansion and the [B, 1, 1, L] mask broadcasts over them.
            if contiguous:
                keys = self.cache.k[i][first : first + b, :, :length]
                values = self.cache.v[i][first : first + b, :, :length]
                out = self._attention(q[by_slot_t].reshape(grouped), keys, values, mask, i, gqa=False)[
                    unsort_t
                ]
            else:
                keys = self.cache.k[i][slots, :, :length]
                values = self.cache.v[i][slots, :, :length]
                out = self._attention(q.reshape(grouped), keys, values, mask, i, gqa=False)
            return out.reshape(b, self.num_heads * self.head_dim)

        for i in range(len(self.layers)):
            h = self._block(i, h, batch.segments, ropes[self.rope_keys[i]], attend)
        for slot, position in zip(batch.slots, batch.positions, strict=True):
            self.cache.lengths[slot] = position + 1
        return self._logits(h)

    def dense_weight(self, layer: int, name: str) -> torch.Tensor:
        """The base weight [out, in] of one linear, for DoRA's norm; refused for quantized layers."""
        block = self.layers[layer]
        module = getattr(block.self_attn if name in self.arch.attention_modules else block.mlp, name)
        if type(module) is not torch.nn.Linear:
            raise ValueError("DoRA adapters need an unquantized base")
        return module.weight
