"""Prepacked bf16 linears (issue 30): bit-equal to F.linear, replacing the weight rather than adding a
copy, and used by an engine over a bf16 base on the CPU; float32 bases keep F.linear."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from lorayard.server.engine.engine import Engine
from lorayard.server.engine.parity_probe import probe_runner
from lorayard.server.engine.prepacked_linear import PackedLinear, prepack_available, prepack_modules
from lorayard.server.settings import Settings

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    not prepack_available(torch.bfloat16, CPU), reason="this CPU or torch has no native oneDNN bf16"
)


def _linear(out_features: int, in_features: int, bias: bool, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (16, 96), (3, 7, 96)], ids=["1row", "16rows", "3d"])
def test_packed_linear_equals_f_linear_bit_for_bit(shape, bias):
    linear = _linear(160, 96, bias, seed=len(shape))
    x = torch.randn(*shape).to(torch.bfloat16)
    packed = PackedLinear.of(linear)
    assert packed is not None
    assert torch.equal(packed(x), linear(x))
    assert torch.equal(packed.dense_weight(), linear.weight)


def test_conv1d_is_packed_from_its_transposed_weight():
    """GPT-2's Conv1D stores [in, out]; its packed twin computes x W + b as the module does."""
    torch.manual_seed(3)
    conv = Conv1D(160, 96).to(torch.bfloat16)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(5, 96).to(torch.bfloat16)
    packed = PackedLinear.of(conv)
    assert packed is not None
    assert torch.equal(packed(x), conv(x))
    assert torch.equal(packed.dense_weight(), conv.weight.T)


def test_float32_and_quantized_like_modules_are_left_alone():
    assert not prepack_available(torch.float32, CPU)
    assert PackedLinear.of(torch.nn.Linear(8, 8)) is None  # float32
    assert PackedLinear.of(torch.nn.Embedding(8, 8).to(torch.bfloat16)) is None


def test_prepacking_drops_the_original_weight_and_counts_a_tied_copy():
    """The packed tensor replaces the module's weight (the old one is freed); a linear sharing the
    embedding's storage (a tied lm_head) is packed too, and its bytes are reported as extra."""
    root = torch.nn.Module()
    root.embed = torch.nn.Embedding(50, 96).to(torch.bfloat16)
    root.proj = _linear(64, 96, False, seed=1)
    root.head = torch.nn.Linear(96, 50, bias=False).to(torch.bfloat16)
    root.head.weight = root.embed.weight
    x = torch.randn(4, 96).to(torch.bfloat16)
    with torch.no_grad():  # an autograd graph would hold the weight
        expected = root.proj(x), root.head(x)
    proj_weight = weakref.ref(root.proj.weight)
    report = prepack_modules(root, ["proj", "head"], tied=root.embed.weight)
    gc.collect()
    assert proj_weight() is None, "the unpacked weight is still referenced"
    assert report.linears == 2 and report.extra_bytes == 50 * 96 * 2
    assert isinstance(root.proj, PackedLinear) and isinstance(root.head, PackedLinear)
    assert torch.equal(root.proj(x), expected[0]) and torch.equal(root.head(x), expected[1])
    assert [name for name, _ in root.named_parameters()] == ["embed.weight"]


def test_a_bf16_engine_runs_packed_linears_in_place_of_the_weights(tiny_base):
    """from_base in bf16 packs every decoder linear and the lm_head (tied to the embedding here), so
    the model's parameters are the embedding and the norms; the startup probe passed over them."""
    config = Settings(device="cpu", max_model_len=64, dtype="bfloat16").engine_config()
    engine = Engine.from_base(tiny_base, config, eos_token_ids=set())
    model = engine.model
    layers = len(engine.runner.layers)
    assert engine.runner.prepacked.linears == 7 * layers + 1
    assert all(isinstance(m, PackedLinear) for layer in engine.runner.linears for m in layer.values())
    assert isinstance(model.lm_head, PackedLinear)
    assert engine.runner.prepacked.extra_bytes == model.get_input_embeddings().weight.nbytes
    assert not [name for name, _ in model.named_parameters() if name.endswith("proj.weight")]
    # dense_weight (DoRA's norm) reads the packed copy back exactly
    plain = AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.bfloat16)
    assert torch.equal(engine.runner.dense_weight(0, "q_proj"), plain.model.layers[0].self_attn.q_proj.weight)
    hidden = torch.randn(2, plain.config.hidden_size).to(torch.bfloat16)
    assert torch.equal(model.lm_head(hidden), F.linear(hidden, plain.lm_head.weight))


def test_a_float32_engine_keeps_its_linears(tiny_base):
    config = Settings(device="cpu", max_model_len=64).engine_config()
    engine = Engine.from_base(tiny_base, config, eos_token_ids=set())
    assert engine.runner.prepacked.linears == 0
    assert type(engine.model.lm_head) is torch.nn.Linear


def test_a_4bit_bf16_engine_packs_only_the_unquantized_lm_head(tiny_base):
    """bitsandbytes' 4-bit layers keep their own matmuls; the lm_head it leaves unquantized (bf16
    here) is packed, and the startup probe passed over both."""
    config = Settings(device="cpu", max_model_len=64, quantization="4bit", dtype="bfloat16").engine_config()
    engine = Engine.from_base(tiny_base, config, eos_token_ids=set())
    assert engine.runner.prepacked.linears == 1
    assert isinstance(engine.model.lm_head, PackedLinear)
    assert not any(isinstance(m, PackedLinear) for layer in engine.runner.linears for m in layer.values())


def test_the_training_jobs_probe_leaves_a_bf16_model_plain(tiny_base):
    """The training job probes the model it then trains (a fresh runner, no engine): nothing is
    packed, so PEFT can still wrap its linears."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.bfloat16).eval()
    assert probe_runner(model).ok
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
