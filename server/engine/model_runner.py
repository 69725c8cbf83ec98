"""Our own forward pass for Llama-family bases, over our KV cache, with per-row LoRA.

The base's HF modules are *called* for every matmul (so bitsandbytes 4-bit/8-bit layers work
unchanged) and for norms and rotary embeddings; attention and the cache are ours, and each linear's
output gets its rows' LoRA deltas from :mod:`lora_ops`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from server.engine.kv_cache import KVCache
from server.engine.lora_ops import ResidentAdapter, Segment, apply_lora, apply_lora_group


@dataclass(frozen=True)
class PrefillRow:
    """A chunk of one request's prompt: ``ids`` at positions ``start .. start + len(ids) - 1``."""

    slot: int
    ids: list[int]
    start: int
    adapter_slot: int | None


@dataclass(frozen=True)
class DecodeBatch:
    """One new token per row. slots, positions: [B]; tokens: [B]; rows grouped by adapter."""

    slots: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor
    segments: list[Segment]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    """Runs prefill chunks and batched decode steps; owns nothing but references to the HF modules."""

    def __init__(self, model: PreTrainedModel, cache: KVCache) -> None:
        config = model.config
        self.model = model
        self.cache = cache
        self.layers = model.model.layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.adapters: dict[int, ResidentAdapter] = {}
        self.device = next(model.parameters()).device

    # -- layers ---------------------------------------------------------------------------------
    def _linear(
        self, module: torch.nn.Module, x: torch.Tensor, layer: int, name: str, segments: list[Segment]
    ) -> torch.Tensor:
        y = module(x)
        if segments:
            apply_lora(y, x, layer, name, segments, self.adapters)
        return y

    def _qkv(
        self, layer_index: int, x: torch.Tensor, segments: list[Segment], cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, hidden] -> q [N, heads, hd], k/v [N, kv_heads, hd] with rotary applied to q, k."""
        attn = self.layers[layer_index].self_attn
        n = x.shape[0]
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        if segments:
            outputs = {"q_proj": q, "k_proj": k, "v_proj": v}
            apply_lora_group(outputs, x, layer_index, "qkv", segments, self.adapters)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        # cos/sin: [N, 1, hd], broadcast over heads
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _mlp(self, layer_index: int, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        mlp = self.layers[layer_index].mlp
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if segments:
            apply_lora_group(
                {"gate_proj": gate, "up_proj": up}, x, layer_index, "gate_up", segments, self.adapters
            )
        return self._linear(mlp.down_proj, mlp.act_fn(gate) * up, layer_index, "down_proj", segments)

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [N] -> cos, sin: [N, 1, hd] in x's dtype."""
        cos, sin = self.model.model.rotary_emb(x, positions[None, :])
        return cos[0, :, None, :], sin[0, :, None, :]

    # -- passes ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, row: PrefillRow) -> torch.Tensor:
        """Run one prompt chunk, writing its K/V into the row's slot. Returns last-token logits [vocab]."""
        t = len(row.ids)
        end = row.start + t
        ids = torch.tensor(row.ids, device=self.device)
        positions = torch.arange(row.start, end, device=self.device)
        segments = [] if row.adapter_slot is None else [Segment(0, t, row.adapter_slot)]
        h = self.model.model.embed_tokens(ids)
        cos, sin = self._rotary(h, positions)
        # Causal over the cached prefix plus this chunk: query i sees keys 0 .. start + i.
        mask = torch.arange(end, device=self.device)[None, :] <= positions[:, None]
        for i, layer in enumerate(self.layers):
            residual = h
            x = layer.input_layernorm(h)
            q, k, v = self._qkv(i, x, segments, cos, sin)
            self.cache.k[i][row.slot, :, row.start : end] = k.transpose(0, 1)
            self.cache.v[i][row.slot, :, row.start : end] = v.transpose(0, 1)
            keys = self.cache.k[i][row.slot, :, :end]
            values = self.cache.v[i][row.slot, :, :end]
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, enable_gqa=True
            )  # [1, heads, t, hd]
            out = out[0].transpose(0, 1).reshape(t, self.num_heads * self.head_dim)
            h = residual + self._linear(layer.self_attn.o_proj, out, i, "o_proj", segments)
            h = h + self._mlp(i, layer.post_attention_layernorm(h), segments)
        self.cache.lengths[row.slot] = end
        last = self.model.model.norm(h[-1:])
        return self.model.lm_head(last)[0].float()

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One token for each row; K/V appended at each row's position. Returns logits [B, vocab]."""
        b = batch.tokens.shape[0]
        h = self.model.model.embed_tokens(batch.tokens)
        cos, sin = self._rotary(h, batch.positions)
        length = int(batch.positions.max()) + 1
        # Row r sees keys 0 .. positions[r]; slots are padded to the longest row.
        mask = (torch.arange(length, device=self.device)[None, :] <= batch.positions[:, None])[
            :, None, None, :
        ]
        # Rows are ordered by adapter, not by slot. When the rows' slots are one contiguous range
        # (a full or freshly filled batch), attention reads that range of the cache as a view, with
        # queries permuted into slot order, instead of gathering a copy of every row's K/V per layer.
        by_slot = torch.argsort(batch.slots)
        first = int(batch.slots[by_slot[0]])
        contiguous = int(batch.slots[by_slot[-1]]) - first + 1 == b
        if contiguous:
            unsort = torch.argsort(by_slot)
            mask = mask[by_slot]
        for i, layer in enumerate(self.layers):
            residual = h
            x = layer.input_layernorm(h)
            q, k, v = self._qkv(i, x, batch.segments, cos, sin)
            self.cache.k[i][batch.slots, :, batch.positions] = k
            self.cache.v[i][batch.slots, :, batch.positions] = v
            if contiguous:
                keys = self.cache.k[i][first : first + b, :, :length]
                values = self.cache.v[i][first : first + b, :, :length]
                out = F.scaled_dot_product_attention(
                    q[by_slot, :, None, :], keys, values, attn_mask=mask, enable_gqa=True
                )[unsort]
            else:
                keys = self.cache.k[i][batch.slots, :, :length]
                values = self.cache.v[i][batch.slots, :, :length]
                out = F.scaled_dot_product_attention(
                    q[:, :, None, :], keys, values, attn_mask=mask, enable_gqa=True
                )
            out = out.reshape(b, self.num_heads * self.head_dim)
            h = residual + self._linear(layer.self_attn.o_proj, out, i, "o_proj", batch.segments)
            h = h + self._mlp(i, layer.post_attention_layernorm(h), batch.segments)
        for slot, position in zip(batch.slots.tolist(), batch.positions.tolist(), strict=True):
            self.cache.lengths[slot] = position + 1
        return self.model.lm_head(self.model.model.norm(h)).float()

    def dense_weight(self, layer: int, name: str) -> torch.Tensor:
        """The base weight [out, in] of one linear, for DoRA's norm; refused for quantized layers."""
        group = self.layers[layer].self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else None
        module = getattr(group if group is not None else self.layers[layer].mlp, name)
        if type(module) is not torch.nn.Linear:
            raise ValueError("DoRA adapters need an unquantized base")
        return module.weight
