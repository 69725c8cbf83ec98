"""Which base architectures LoRAyard serves exactly, and what the model runner must know about each.

The one support test both sides use: the server refuses an unsupported base at startup, the training
job refuses to train (and to publish) for one, both through :func:`architecture_for`. What is not
listed here is refused by name, never served by a forward pass that was not written for it.

A spec holds only what the HF modules do not tell by themselves. Everything the modules *do* carry is
read from them by the runner: norms are called as modules (Gemma's ``(1 + w)``), the embedding is the
model's own (Gemma's ``sqrt(hidden)`` scale), rotary is the model's ``rotary_emb`` (rope scaling,
partial rotary, Gemma 3's local/global rope), attention scaling is each attention module's
``scaling`` (Gemma's ``query_pre_attn_scalar``), q/k/v bias lives in the linears. And the server
still checks the runner against the HF forward at startup (``lorayard/server/engine/parity_probe.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class UnsupportedArchitecture(ValueError):
    """The base cannot be served exactly; the message names the architecture and the supported ones."""


Family = Literal["llama", "gpt2", "opt"]
"""How a decoder is laid out: Llama's (rotary, ``model.layers``, gated MLP; every architecture but
two), GPT-2's (learned positions, ``transformer.h``, fused ``Conv1D`` ``c_attn``, LayerNorm, GELU) or
OPT's (learned positions offset by 2, ``model.decoder.layers``, ReLU ``fc1``/``fc2``, pre- or
post-norm, optional ``project_in``/``project_out``)."""

_FAMILY_LAYERS: dict[str, str] = {
    "llama": "model.layers",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
}

_FAMILY_LINEARS: dict[str, dict[str, str]] = {
    # GPT-2 names two linears c_proj (attention output, MLP output): their keys carry their parent.
    "gpt2": {
        "c_attn": "attn.c_attn",
        "attn.c_proj": "attn.c_proj",
        "c_fc": "mlp.c_fc",
        "mlp.c_proj": "mlp.c_proj",
    },
    "opt": {
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "out_proj": "self_attn.out_proj",
        "fc1": "fc1",
        "fc2": "fc2",
    },
}


@dataclass(frozen=True)
class Architecture:
    """One supported ``model_type`` and how its decoder block differs from Llama's."""

    model_type: str
    name: str
    """What users call it, for messages and docs."""
    family: Family = "llama"
    """The decoder layout (:data:`Family`); the fields below refine the Llama family."""
    fused_projections: bool = False
    """Phi-3: one ``qkv_proj`` and one ``gate_up_proj`` linear (LoRA targets them as such)."""
    qk_norm: bool = False
    """Qwen3, Gemma 3: RMSNorm over each head of q and k (``q_norm``/``k_norm``) before rotary."""
    sandwich_norms: bool = False
    """Gemma 2/3: four norms per block; ``post_attention_layernorm`` normalizes the attention output
    before the residual add, ``pre_/post_feedforward_layernorm`` wrap the MLP."""
    plain_rms_norm: bool = True
    """The norm modules compute ``w * x / rms(x)``, so the runner may use one fused op for them;
    False (Gemma's ``(1 + w)``, computed in float32) calls the module itself."""
    rotary_per_layer_type: bool = False
    """Gemma 3: ``rotary_emb(x, positions, layer_type)`` differs for sliding and full layers."""
    vision: bool = False
    """Qwen2.5-VL, Qwen3-VL: a vision tower (``model.visual``, run as transformers' module) whose image
    embeddings replace the image-pad tokens' ones, and multimodal rotary positions (M-RoPE: 3-D
    t/h/w position ids for image tokens); the language model sits at ``model.language_model``."""
    packs_exactly: bool = True
    """Whether transformers' forward keeps padding-free packed examples apart (their restarted
    ``position_ids``), so the training job's ``packing`` gives the padded loss. OPT's does not: its
    packed loss differs, so the job refuses packing on it."""

    @property
    def rotary(self) -> bool:
        """Rotary positions (the Llama family); GPT-2 and OPT add learned position embeddings."""
        return self.family == "llama"

    @property
    def decoder_path(self) -> str:
        """The Llama family's decoder module (embed_tokens, layers, norm, rotary_emb), from the top."""
        return "model.language_model" if self.vision else "model"

    @property
    def layers_path(self) -> str:
        """Where the decoder blocks are, from the CausalLM (PEFT keys start with it)."""
        return f"{self.decoder_path}.layers" if self.vision else _FAMILY_LAYERS[self.family]

    @property
    def linear_paths(self) -> dict[str, str]:
        """Each LoRA-targetable linear of a decoder block: its key (how adapters, the stacked LoRA and
        the runner name it; the PEFT name unless two linears share one) -> its path in the block."""
        if self.family != "llama":
            return dict(_FAMILY_LINEARS[self.family])
        attention = (
            ("qkv_proj", "o_proj") if self.fused_projections else ("q_proj", "k_proj", "v_proj", "o_proj")
        )
        mlp = (
            ("gate_up_proj", "down_proj") if self.fused_projections else ("gate_proj", "up_proj", "down_proj")
        )
        return {**{n: f"self_attn.{n}" for n in attention}, **{n: f"mlp.{n}" for n in mlp}}

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The linears of a decoder block that an adapter may target, as PEFT names them
        (``target_modules``; GPT-2's ``c_proj`` is both of its c_proj linears, as in PEFT)."""
        return tuple(dict.fromkeys(path.rsplit(".", 1)[-1] for path in self.linear_paths.values()))

    def peft_target_modules(self, names: list[str] | tuple[str, ...]) -> list[str] | str:
        """PEFT's ``target_modules`` for these linears of the language model: the names themselves, or
        for a vision-language base a regex anchored to the language model's blocks (a bare name would
        also take the vision tower's ``gate_proj``/``up_proj``/``down_proj``)."""
        if not self.vision:
            return list(names)
        return rf"^.*{self.layers_path.replace('.', '[.]')}[.]\d+[.].*({'|'.join(names)})$"

    @property
    def fusable(self) -> bool:
        """Whether q/k/v and gate/up are separate bias-free-able linears the runner may fuse on a GPU."""
        return self.family == "llama" and not self.fused_projections


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "Llama (1-3.x, SmolLM)"),
        Architecture("mistral", "Mistral"),
        Architecture("qwen2", "Qwen2 / Qwen2.5"),
        Architecture("qwen3", "Qwen3", qk_norm=True),
        Architecture("gemma2", "Gemma 2", sandwich_norms=True, plain_rms_norm=False),
        Architecture(
            "gemma3_text",
            "Gemma 3 (text)",
            qk_norm=True,
            sandwich_norms=True,
            plain_rms_norm=False,
            rotary_per_layer_type=True,
        ),
        Architecture("qwen2_5_vl", "Qwen2.5-VL", vision=True),
        Architecture("qwen3_vl", "Qwen3-VL", vision=True, qk_norm=True),
        Architecture("phi3", "Phi-3 / Phi-4-mini", fused_projections=True),
        Architecture("gpt2", "GPT-2 / DistilGPT-2", family="gpt2", plain_rms_norm=False),
        Architecture("opt", "OPT", family="opt", plain_rms_norm=False, packs_exactly=False),
    )
}
"""Every architecture the engine serves, by HF ``model_type``."""

_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
"""Rope types whose frequencies change with the sequence length; see :func:`exact_context_limit`."""


def supported_list() -> str:
    return ", ".join(ARCHITECTURES)


def architecture_for(config: PretrainedConfig) -> Architecture:
    """The spec for ``config``'s architecture; UnsupportedArchitecture (naming it) for anything else."""
    model_type = getattr(config, "model_type", None)
    classes = ", ".join(getattr(config, "architectures", None) or []) or "no architectures field"
    arch = ARCHITECTURES.get(str(model_type))
    if arch is None:
        raise UnsupportedArchitecture(
            f"base architecture {model_type!r} ({classes}) is not supported by the serving engine; "
            f"supported model types: {supported_list()}"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedArchitecture(
            f"base architecture {model_type!r} with use_bidirectional_attention=true (an encoder) cannot "
            f"generate text; supported model types: {supported_list()}"
        )
    return arch


def sliding_window(config: PretrainedConfig, layer: int) -> int | None:
    """How many keys (the query's own included) layer ``layer`` attends to; None for all.

    Configs with ``layer_types`` (Qwen2/3, Gemma 2/3) window their ``sliding_attention`` layers only;
    the others (Mistral, Phi-3) window every layer when ``sliding_window`` is set. Same rule as HF's
    ``sliding_window_overlay``: key ``k`` is visible from query ``q`` when ``q - window < k <= q``.
    """
    config = language_config(config)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer] == "sliding_attention" else None
    return window


def language_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config: a vision-language base's ``text_config``, else the config itself."""
    return config.get_text_config()


def head_dim(config: PretrainedConfig) -> int:
    config = language_config(config)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config: PretrainedConfig) -> int:
    """Key/value heads; GPT-2 and OPT configs have no ``num_key_value_heads`` (one per query head)."""
    config = language_config(config)
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def post_norm(config: PretrainedConfig) -> bool:
    """OPT-350m normalizes after each residual add (``do_layer_norm_before=False``); all else before."""
    return getattr(config, "do_layer_norm_before", True) is False


def exact_context_limit(config: PretrainedConfig) -> int | None:
    """The longest context served exactly, when the architecture's own limit is shorter.

    Dynamic-NTK and LongRoPE rotary change their frequencies once a sequence passes the original
    context length, by the longest sequence in the call; rows of one batched decode step would see
    each other's length. Up to ``original_max_position_embeddings`` they are plain rope, so we serve
    that far and no further.
    """
    params: dict[str, Any] = getattr(language_config(config), "rope_parameters", None) or {}
    rope_type = params.get("rope_type")
    if rope_type not in _LENGTH_DEPENDENT_ROPE:
        return None
    original = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    return int(original) if original else None


def linear_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable linear of ``config``'s decoder block."""
    arch = architecture_for(config)
    config = language_config(config)
    hidden = config.hidden_size
    if arch.family == "gpt2":
        inner = config.n_inner or 4 * hidden
        return {
            "c_attn": (hidden, 3 * hidden),
            "attn.c_proj": (hidden, hidden),
            "c_fc": (hidden, inner),
            "mlp.c_proj": (inner, hidden),
        }
    if arch.family == "opt":
        square = (hidden, hidden)
        ffn = config.ffn_dim
        return {
            "q_proj": square,
            "k_proj": square,
            "v_proj": square,
            "out_proj": square,
            "fc1": (hidden, ffn),
            "fc2": (ffn, hidden),
        }
    hd = head_dim(config)
    q_out = config.num_attention_heads * hd
    kv_out = kv_heads(config) * hd
    inter = config.intermediate_size
    if arch.fused_projections:
        return {
            "qkv_proj": (hidden, q_out + 2 * kv_out),
            "o_proj": (q_out, hidden),
            "gate_up_proj": (hidden, 2 * inter),
            "down_proj": (inter, hidden),
        }
    return {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
