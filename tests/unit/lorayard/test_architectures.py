"""The support test both sides share: what is refused and why, and the per-layer facts it derives."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from lorayard.architectures import (
    ARCHITECTURES,
    UnsupportedArchitecture,
    architecture_for,
    exact_context_limit,
    linear_shapes,
    sliding_window,
)


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "mixtral", "qwen3_moe", "gemma3", "falcon"])
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
