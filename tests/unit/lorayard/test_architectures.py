"""The support test both sides share: what is refused and why, and the per-layer facts it derives."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from lorayard.architectures import (
    ARCHITECTURES,
    UnsupportedArchitecture,
    architecture_for,
    exact_context_limit,
    kv_heads,
    linear_shapes,
    post_norm,
    sliding_window,
)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gemma3", "falcon", "gpt_neox"])
def test_unlisted_architectures_are_refused_naming_them_and_the_supported(model_type):
    with pytest.raises(UnsupportedArchitecture) as caught:
        architecture_for(AutoConfig.for_model(model_type))
    message = str(caught.value)
    assert f"{model_type!r}" in message and "\n" not in message
    assert all(supported in message for supported in ARCHITECTURES)


def test_an_encoder_variant_of_a_listed_architecture_is_refused():
    config = AutoConfig.for_model("gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(UnsupportedArchitecture, match="use_bidirectional_attention"):
        architecture_for(config)


def test_sliding_window_follows_layer_types_or_covers_every_layer():
    gemma = AutoConfig.for_model("gemma2", num_hidden_layers=4, sliding_window=7)
    assert [sliding_window(gemma, i) for i in range(4)] == [7, None, 7, None]
    mistral = AutoConfig.for_model("mistral", num_hidden_layers=2, sliding_window=7)
    assert [sliding_window(mistral, i) for i in range(2)] == [7, 7]
    qwen = AutoConfig.for_model("qwen2", num_hidden_layers=2, use_sliding_window=False, sliding_window=7)
    assert [sliding_window(qwen, i) for i in range(2)] == [None, None]


def test_length_dependent_rope_caps_the_exact_context():
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    config = AutoConfig.for_model("llama", rope_parameters=dynamic, max_position_embeddings=4096)
    config.rope_parameters["original_max_position_embeddings"] = 2048
    assert exact_context_limit(config) == 2048
    assert exact_context_limit(AutoConfig.for_model("llama")) is None


def test_phi3_targets_are_its_fused_linears():
    config = AutoConfig.for_model(
        "phi3", hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2
    )
    assert linear_shapes(config) == {
        "qkv_proj": (64, 64 + 2 * 32),
        "o_proj": (64, 64),
        "gate_up_proj": (64, 192),
        "down_proj": (96, 64),
    }


def test_gpt2_targets_are_its_conv1d_linears_keyed_apart_where_peft_names_collide():
    """GPT-2 names both output linears c_proj: keys carry the parent, PEFT's target names do not."""
    config = AutoConfig.for_model("gpt2", n_embd=64, n_head=4, n_layer=2)
    arch = architecture_for(config)
    assert linear_shapes(config) == {
        "c_attn": (64, 192),
        "attn.c_proj": (64, 64),
        "c_fc": (64, 256),
        "mlp.c_proj": (256, 64),
    }
    assert arch.lora_targets == ("c_attn", "c_proj", "c_fc")
    assert arch.layers_path == "transformer.h" and not arch.rotary


def test_opt_targets_and_its_two_norm_orders():
    config = AutoConfig.for_model("opt", hidden_size=64, ffn_dim=96, num_attention_heads=4)
    arch = architecture_for(config)
    assert arch.lora_targets == ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    assert linear_shapes(config)["fc1"] == (64, 96) and linear_shapes(config)["out_proj"] == (64, 64)
    assert arch.layers_path == "model.decoder.layers"
    assert not post_norm(config)
    assert post_norm(AutoConfig.for_model("opt", do_layer_norm_before=False))
    assert kv_heads(config) == 4
