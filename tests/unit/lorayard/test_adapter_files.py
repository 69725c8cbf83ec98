import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from lorayard.adapter_files import AdapterFormatError, load_adapter
from lorayard.architectures import ARCHITECTURES
from lorayard.testing.random_adapter import build_random_adapter
from lorayard.volume import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE


def _save_adapter(base_dir, folder, **lora):
    return build_random_adapter(base_dir, folder, seed=1, **lora)


@pytest.mark.parametrize(
    "lora",
    [
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "use_rslora": True},
        {"r": 8, "lora_alpha": 16, "target_modules": ["o_proj"], "rank_pattern": {"o_proj": 2}},
    ],
)
def test_loaded_modules_reproduce_peft_delta(tiny_base_dir, tmp_path, lora):
    peft_model = _save_adapter(tiny_base_dir, tmp_path / "a", **lora)
    base_config = AutoConfig.from_pretrained(tiny_base_dir)
    weights = load_adapter(tmp_path / "a", base_config)
    for (layer, name), module in weights.modules.items():
        x = torch.randn(3, module.a.shape[1])
        group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        peft_layer = getattr(getattr(peft_model.base_model.model.model.layers[layer], group), name)
        with torch.no_grad():
            expected = peft_layer(x) - peft_layer.base_layer(x)
        ours = module.scaling * (x @ module.a.T @ module.b.T)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert weights.max_rank == max(m.rank for m in weights.modules.values())


def test_wrong_shapes_are_refused(tiny_base_dir, real_base, tmp_path):
    _save_adapter(tiny_base_dir, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    real_config = AutoConfig.from_pretrained(real_base.path)
    with pytest.raises(AdapterFormatError, match=r"do not fit|layer"):
        load_adapter(tmp_path / "a", real_config)


def test_pickle_and_garbage_are_refused(tiny_base_dir, tmp_path):
    folder = tmp_path / "a"
    _save_adapter(tiny_base_dir, folder, r=4, lora_alpha=8, target_modules=["q_proj"])
    config = AutoConfig.from_pretrained(tiny_base_dir)
    (folder / ADAPTER_WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterFormatError, match="safetensors"):
        load_adapter(folder, config)
    (folder / ADAPTER_WEIGHTS_FILE).unlink()
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterFormatError, match="pickle"):
        load_adapter(folder, config)


def test_unsupported_config_is_refused_before_weights(tiny_base_dir, tmp_path):
    folder = tmp_path / "a"
    _save_adapter(tiny_base_dir, folder, r=4, lora_alpha=8, target_modules=["q_proj"])
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    config["modules_to_save"] = ["lm_head"]
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="modules_to_save"):
        load_adapter(folder, AutoConfig.from_pretrained(tiny_base_dir))


def test_plain_peft_reloads_what_we_validate(tiny_base_dir, tmp_path):
    _save_adapter(tiny_base_dir, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "a")
    assert load_adapter(tmp_path / "a", base.config).target_modules == ["q_proj", "v_proj"]
    assert reloaded.peft_config["default"].r == 4


def test_an_adapter_for_another_architecture_is_refused_listing_the_targets(
    tiny_arch_base, tiny_base_dir, tmp_path
):
    """PEFT's Phi-3 adapter (LoRA on the fused qkv_proj/gate_up_proj) does not fit a Llama base."""
    from lorayard.testing.random_adapter import build_random_adapter

    build_random_adapter(
        tiny_arch_base("phi3"), tmp_path / "phi", 0, r=4, lora_alpha=8, target_modules="all-linear"
    )
    assert load_adapter(
        tmp_path / "phi", AutoConfig.from_pretrained(tiny_arch_base("phi3"))
    ).target_modules == [
        "down_proj",
        "gate_up_proj",
        "o_proj",
        "qkv_proj",
    ]
    with pytest.raises(AdapterFormatError, match=r"a Llama .* base does not have .*its LoRA targets: q_proj"):
        load_adapter(tmp_path / "phi", AutoConfig.from_pretrained(tiny_base_dir))


def test_gpt2_conv1d_adapters_reproduce_peft_and_keep_both_c_proj_apart(tiny_arch_base, tmp_path):
    """PEFT saves LoRA on GPT-2's Conv1D linears (fan_in_fan_out) with A [r, in], B [out, r], under
    transformer.h.N.attn|mlp: both c_proj linears load, each under its own key, with PEFT's delta."""
    base = tiny_arch_base("gpt2")
    peft_model = _save_adapter(
        base, tmp_path / "g", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]
    )
    weights = load_adapter(tmp_path / "g", AutoConfig.from_pretrained(base))
    assert {name for _, name in weights.modules} == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"}
    assert weights.target_modules == ["c_attn", "c_fc", "c_proj"]
    blocks = peft_model.base_model.model.transformer.h
    paths = ARCHITECTURES["gpt2"].linear_paths
    for (layer, name), module in weights.modules.items():
        peft_layer = blocks[layer].get_submodule(paths[name])
        x = torch.randn(3, module.a.shape[1])
        with torch.no_grad():
            expected = peft_layer(x) - peft_layer.base_layer(x)
        torch.testing.assert_close(
            module.scaling * (x @ module.a.T @ module.b.T), expected, rtol=1e-4, atol=1e-5
        )


def test_adapters_do_not_cross_between_gpt2_opt_and_llama(tiny_arch_base, tiny_base_dir, tmp_path):
    """A GPT-2 adapter on a Llama base and an OPT adapter on a GPT-2 base are refused, naming the targets."""
    _save_adapter(tiny_arch_base("gpt2"), tmp_path / "g", r=4, lora_alpha=8, target_modules=["c_attn"])
    _save_adapter(tiny_arch_base("opt"), tmp_path / "o", r=4, lora_alpha=8, target_modules=["q_proj", "fc1"])
    with pytest.raises(
        AdapterFormatError,
        match=r"attn\.c_attn, which a Llama .* base does not have \(its LoRA targets: q_proj",
    ):
        load_adapter(tmp_path / "g", AutoConfig.from_pretrained(tiny_base_dir))
    with pytest.raises(
        AdapterFormatError,
        match=r"which a GPT-2 .* base does not have \(its LoRA targets: c_attn, c_proj, c_fc\)",
    ):
        load_adapter(tmp_path / "o", AutoConfig.from_pretrained(tiny_arch_base("gpt2")))
    assert load_adapter(tmp_path / "o", AutoConfig.from_pretrained(tiny_arch_base("opt"))).target_modules == [
        "fc1",
        "q_proj",
    ]


@pytest.mark.parametrize(
    "kind",
    [
        "slow_pattern",
        "target_regex",
        "infinite_alpha",
        "huge_alpha",
        "nan_alpha",
        "rank_zero",
        "overflowing_scale",
    ],
)
def test_hostile_configs_are_refused_naming_the_field(tiny_base_dir, tmp_path, kind):
    from lorayard.testing.hostile_adapter import HOSTILE_FIELDS, build_hostile_adapter

    folder = build_hostile_adapter(kind, tiny_base_dir, tmp_path / "vol" / kind)
    with pytest.raises(AdapterFormatError, match=HOSTILE_FIELDS[kind]) as refused:
        load_adapter(folder, AutoConfig.from_pretrained(tiny_base_dir))
    assert str(tmp_path) not in str(refused.value)  # no server path in what reaches a client


def test_the_catastrophic_alpha_pattern_loads_as_peft_reads_it(tiny_base_dir, tmp_path):
    """PEFT gives no module ``(.*)*(.*)*y``'s alpha (no name ends in y): it loads, in bounded time."""
    from lorayard.testing.hostile_adapter import build_hostile_adapter

    folder = build_hostile_adapter("regex_pattern", tiny_base_dir, tmp_path / "vol" / "a")
    weights = load_adapter(folder, AutoConfig.from_pretrained(tiny_base_dir))
    assert {m.scaling for m in weights.modules.values()} == {2.0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target_modules": ["k_proj"]}, "target_modules selects"),
        ({"r": 8}, "r gives it rank 8"),
        ({"rank_pattern": {"v_proj": 2}}, "rank_pattern gives it rank 2"),
        ({"use_dora": True}, "use_dora"),
        ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
    ],
)
def test_tensors_that_peft_would_not_load_as_they_are_are_refused(tiny_base_dir, tmp_path, change, message):
    folder = tmp_path / "a"
    _save_adapter(tiny_base_dir, folder, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config | change))
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(folder, AutoConfig.from_pretrained(tiny_base_dir))


def test_a_non_finite_dora_magnitude_is_refused_naming_it(tiny_base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "dora"
    _save_adapter(tiny_base_dir, folder, r=4, lora_alpha=8, target_modules=["o_proj"], use_dora=True)
    file = folder / ADAPTER_WEIGHTS_FILE
    tensors = load_file(str(file))
    magnitude = next(k for k in tensors if "lora_magnitude_vector" in k)
    tensors[magnitude] = torch.full_like(tensors[magnitude], float("inf"))
    save_file(tensors, str(file))
    with pytest.raises(AdapterFormatError, match="lora_magnitude_vector holds NaN or inf"):
        load_adapter(folder, AutoConfig.from_pretrained(tiny_base_dir))
