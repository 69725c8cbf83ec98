"""A base model with random weights, built from a real one's config and tokenizer.

Three uses: the tiny 2-layer model that unit tests and quick soaks run on (``--tiny``); tiny bases of
every other architecture, from that architecture's own HF config with the same tokenizer
(``--architecture qwen3``), so each serving path is tested in seconds; and a full-size stand-in
where the real weights cannot travel (the GPU machine receives at most 64 MiB; the embedded GGUF
alone is 98 MB). Same shapes means the same speed, so benchmarks on it are fair; only what the model
says is noise.

    python -m lorayard.testing.random_base OUT [--like FOLDER]
        [--tiny | --llama-8b | --architecture MODEL_TYPE]
        [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
}
"""Overrides for the tiny model: same architecture family and vocabulary, a narrow width, 2 layers."""


LLAMA_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
"""Llama-3-8B's shape (its published config.json), over the default base's Llama config and tokenizer:
token ids stay below the tokenizer's size, the lm_head reads the full 128256-row matrix."""


SLIDING_WINDOW = 5
"""Tiny bases' sliding window: shorter than the tests' prompts, so the windowed path is exercised."""

_TINY_DECODER: dict[str, Any] = {**TINY, "sliding_window": SLIDING_WINDOW, "initializer_range": 0.1}

TINY_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Llama 3's rope scaling, with an original context short enough that the scaled bands matter.
    "llama": {
        **TINY,
        "initializer_range": 0.1,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    "mistral": _TINY_DECODER,
    # q/k/v bias; layers from max_window_layers on use the sliding window.
    "qwen2": {**_TINY_DECODER, "use_sliding_window": True, "max_window_layers": 1},
    "qwen3": {**_TINY_DECODER, "use_sliding_window": True, "max_window_layers": 1},
    # Soft-capped attention and logits, query_pre_attn_scalar != head_dim, alternating windows.
    "gemma2": {**_TINY_DECODER, "query_pre_attn_scalar": 32, "attn_logit_softcapping": 5.0},
    "gemma3_text": {
        **_TINY_DECODER,
        "query_pre_attn_scalar": 32,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    # Partial rotary (as Phi-4-mini), fused qkv_proj / gate_up_proj.
    "phi3": {
        **_TINY_DECODER,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    },
    # Learned positions, fused Conv1D c_attn, LayerNorm, GELU (tanh), tied embeddings.
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512, "initializer_range": 0.1},
    # OPT-125m's layout: pre-norm, ReLU fc1/fc2, learned positions offset by 2.
    "opt": {
        "hidden_size": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 64,
        "max_position_embeddings": 512,
        "init_std": 0.1,
    },
    # Refused by the server (the tests of the refusal path): a mixture of experts.
    "mixtral": {**TINY, "num_local_experts": 2, "num_experts_per_tok": 1},
}
"""Overrides for ``AutoConfig.for_model(model_type)`` per architecture: 2 layers, width 64."""

TINY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # DistilGPT-2 is GPT-2 with 6 layers.
    "distilgpt2": ("gpt2", {"n_layer": 6}),
    # OPT-350m: post-norm (no final norm) and word embeddings narrower than the decoder, so
    # project_in / project_out run on the way in and out.
    "opt-350m": ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
}
"""Other shapes of a listed architecture, by name: (model_type, overrides over its tiny sizes)."""


def build_random_architecture(
    model_type: str, tokenizer_source: Path, out: Path, overrides: dict[str, Any] | None = None, seed: int = 0
) -> Path:
    """A float32 random base of ``model_type`` (TINY_ARCHITECTURES sizes, plus ``overrides``; or a
    TINY_VARIANTS name) with the tokenizer of ``tokenizer_source`` and a vocabulary of its size.

    Norm weights and biases are randomized too (HF initializes them to constants), so a forward that
    forgets Gemma's ``(1 + w)`` or Qwen2's q/k/v bias cannot pass for a right one.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if model_type in TINY_VISION_LANGUAGE:
        return build_random_vision_language(model_type, tokenizer_source, out, overrides, seed)
    model_type, variant = TINY_VARIANTS.get(model_type, (model_type, {}))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        **special,
        **{**TINY_ARCHITECTURES.get(model_type, {}), **variant, **(overrides or {})},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # norms and biases
                param.add_(torch.randn_like(param) * 0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


_VL_TEXT: dict[str, Any] = {
    **TINY,
    "initializer_range": 0.1,
    # M-RoPE: the sections sum to head_dim / 2
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
}
_VL_VISION: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
}
TINY_VISION_LANGUAGE: dict[str, dict[str, Any]] = {
    # Qwen2.5-VL: a Qwen2 language model (q/k/v bias) with M-RoPE, and a 2-block vision tower (one
    # windowed, one full-attention block) merging 2x2 patches.
    "qwen2_5_vl": {
        "text_config": _VL_TEXT,
        "vision_config": {**_VL_VISION, "fullatt_block_indexes": [1], "window_size": 56},
    },
    # Qwen3-VL: a Qwen3 language model (q/k norms), interleaved M-RoPE, and deepstack: the vision
    # tower's blocks 0 and 1 also feed the first two decoder layers' image positions.
    "qwen3_vl": {
        "text_config": _VL_TEXT,
        "vision_config": {**_VL_VISION, "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]},
    },
}
"""Overrides for ``AutoConfig.for_model(model_type)`` per vision-language architecture: the language
model as the tiny text bases, a vision tower of width 32."""

IMAGE_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
"""Qwen-VL's image markers: start, the placeholder each image's embeddings replace, end."""

TINY_IMAGE_PIXELS = (28 * 28, 112 * 112)
"""The tiny bases' image processor's (min, max) pixels: a 56x56 image is 16 patches, 4 image tokens."""


def build_random_vision_language(
    model_type: str, tokenizer_source: Path, out: Path, overrides: dict[str, Any] | None = None, seed: int = 0
) -> Path:
    """A float32 random vision-language base of ``model_type`` (TINY_VISION_LANGUAGE sizes) with the
    tokenizer of ``tokenizer_source`` plus Qwen-VL's image tokens, and an image processor built
    locally (the PIL one: transformers' processor class wants torchvision for its video half)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    tokenizer.add_tokens(list(IMAGE_TOKENS), special_tokens=True)
    start, pad, end = (tokenizer.get_vocab()[token] for token in IMAGE_TOKENS)
    sizes = TINY_VISION_LANGUAGE[model_type]
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text = {**sizes["text_config"], "vocab_size": len(tokenizer), **special}
    config = AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=sizes["vision_config"],
        image_token_id=pad,
        vision_start_token_id=start,
        vision_end_token_id=end,
        **special,
        **(overrides or {}),
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # norms and biases
                param.add_(torch.randn_like(param) * 0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    low, high = TINY_IMAGE_PIXELS
    patch = int(config.vision_config.patch_size)  # 14 for Qwen2.5-VL, 16 for Qwen3-VL
    Qwen2VLImageProcessorPil(min_pixels=low, max_pixels=high, patch_size=patch).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_random_base(
    like: Path,
    out: Path,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    *,
    device: str = "cpu",
    dtype: str = "float32",
) -> Path:
    """Write a random-weight model with ``like``'s config (plus ``overrides``) and tokenizer.

    ``like`` needs only config and tokenizer files, no weights. ``device``: where the weights are
    initialized (on a GPU an 8B model takes seconds there, minutes on the CPU); ``dtype``: the dtype
    they are made and saved in (bfloat16 halves an 8B model's 32 GB).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(like)
    config.update(overrides or {})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(like).save_pretrained(out)
    return out


def without_chat_template(source: Path, out: Path) -> Path:
    """A copy of the model folder ``source`` with its chat template removed, as raw base checkpoints
    (gpt2, distilgpt2, opt, most pretrained-only bases) come."""
    import json
    import shutil

    shutil.copytree(source, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--like", type=Path, default=None, help="config source (default: the default base)")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--tiny", action="store_true", help="2 layers, width 64 (the unit tests' model)")
    shape.add_argument("--llama-8b", action="store_true", help="Llama-3-8B's shape (LLAMA_8B)")
    parser.add_argument("--device", default="cpu", help="where to initialize the weights (cuda: fast)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--architecture",
        choices=sorted([*TINY_ARCHITECTURES, *TINY_VARIANTS, *TINY_VISION_LANGUAGE]),
        help="a tiny base of this HF model_type (or TINY_VARIANTS shape) with --like's tokenizer",
    )
    args = parser.parse_args()
    if args.like is None:
        from lorayard.base_model import resolve_base_model

        args.like = resolve_base_model().path
    if args.architecture:
        print(build_random_architecture(args.architecture, args.like, args.out))
        return
    overrides = TINY if args.tiny else LLAMA_8B if args.llama_8b else None
    print(build_random_base(args.like, args.out, overrides, device=args.device, dtype=args.dtype))


if __name__ == "__main__":
    main()
