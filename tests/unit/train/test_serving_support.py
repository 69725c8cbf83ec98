"""The training job uses the server's support test: a base the server would refuse is refused before
training (exit 5) and at publish; adapters trained on the new architectures (GPT-2 and OPT-350m
included) serve with PEFT parity."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoConfig

from lorayard.adapter_files import load_adapter
from lorayard.architectures import ARCHITECTURES, architecture_for
from lorayard.base_model import resolve_base_model
from lorayard.server.engine.engine import Engine
from lorayard.server.engine.types import Request, SamplingParams
from lorayard.server.settings import Settings
from lorayard.train.__main__ import EXIT_CONFIG, EXIT_SERVING_CHECK, main
from lorayard.train.publish import ServingCheckError, check_serving_compatible
from lorayard.volume import AdapterVolume

from ..server.conftest import peft_greedy
from .conftest import FAST


def _args(base, adapters_dir, data) -> list[str]:
    return ["--base-model", str(base), "--adapters-dir", str(adapters_dir), "--data", str(data), *FAST]


@pytest.mark.parametrize("model_type", ["mixtral"])
def test_unservable_base_is_refused_before_training(
    tiny_arch_base, adapters_dir, chat_file, capsys, model_type
):
    args = _args(tiny_arch_base(model_type), adapters_dir, chat_file)
    assert main([*args, "--name", "nope", "--max-steps", "2"]) == EXIT_SERVING_CHECK
    err = capsys.readouterr().err
    assert f"base architecture {model_type!r}" in err and "nothing trained or published" in err
    assert all(supported in err for supported in ARCHITECTURES)
    assert not (adapters_dir / "nope").exists()


def test_packing_is_refused_on_a_vision_language_base(tiny_arch_base, adapters_dir, chat_file, capsys):
    """Packed rows would need each image's M-RoPE positions: exit 2 before any data or weight is read."""
    args = _args(tiny_arch_base("qwen2_5_vl"), adapters_dir, chat_file)
    assert main([*args, "--name", "nope", "--packing"]) == EXIT_CONFIG
    assert "packing is not supported on a vision-language base (Qwen2.5-VL)" in capsys.readouterr().err
    assert not (adapters_dir / "nope").exists()


def test_publish_check_refuses_an_unservable_base(tiny_arch_base, tmp_path):
    """The publish step's check (the same test) on its own: nothing is read for an unservable base."""
    with pytest.raises(ServingCheckError, match=r"'mixtral'.*supported model types"):
        check_serving_compatible(tmp_path, AutoConfig.from_pretrained(tiny_arch_base("mixtral")))


@pytest.mark.parametrize(("model_type", "named"), [("phi3", "qkv_proj"), ("gpt2", "c_attn, c_proj, c_fc")])
def test_target_modules_the_base_lacks_are_a_config_error(
    tiny_arch_base, adapters_dir, chat_file, capsys, model_type, named
):
    """Llama's q_proj,v_proj on a Phi-3 or GPT-2 base: exit 2 before training, naming its linears."""
    args = _args(tiny_arch_base(model_type), adapters_dir, chat_file)
    assert main([*args, "--name", "nope", "--target-modules", "q_proj,v_proj"]) == EXIT_CONFIG
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("model_type", ["qwen3", "phi3", "gpt2", "opt-350m"])
def test_adapter_trained_by_the_job_serves_with_peft_parity(
    tiny_arch_base, adapters_dir, chat_file, model_type
):
    base = tiny_arch_base(model_type)
    args = _args(base, adapters_dir, chat_file)
    assert main([*args, "--name", "arch", "--max-steps", "3", "--target-modules", "all-linear"]) == 0
    folder = AdapterVolume(adapters_dir).resolve("arch").path
    config = AutoConfig.from_pretrained(base)
    weights = load_adapter(folder, config)
    # all-linear: every decoder linear (OPT-350m's project_in/project_out stay out), as PEFT names them
    assert set(weights.target_modules) == set(architecture_for(config).lora_targets)
    engine = Engine.from_base(
        resolve_base_model(str(base)),
        Settings(device="cpu", max_model_len=64).engine_config(),
        dtype=torch.float32,
        eos_token_ids=set(),
    )

    class Handle:
        name = key = "arch"
        slot = engine.load_adapter_weights("arch", weights)

    prompt = [1, 9690, 198, 2683, 359, 253, 42, 7]

    async def run() -> list[int]:
        engine.start()
        request = Request("r", prompt, SamplingParams(max_tokens=8, temperature=0.0), Handle())
        return [e.token_id async for e in engine.submit(request) if e.token_id is not None]

    try:
        tokens = asyncio.run(run())
    finally:
        engine.stop()
    assert tokens == peft_greedy(base, folder, prompt, 8)


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_packing_is_exact_or_refused(
    tiny_arch_base, adapters_dir, chat_file, real_tokenizer, capsys, model_type
):
    """packs_exactly matches what transformers does (GPT-2: the packed loss is the padded one; OPT: it
    is not), and the job refuses --packing where it is not exact, before training."""
    from transformers import AutoModelForCausalLM

    from lorayard.train.config import TrainConfig
    from lorayard.train.train import IGNORE_INDEX, collator

    base = tiny_arch_base(model_type)
    torch.manual_seed(0)
    features = []
    for length in (7, 12, 5):
        ids = torch.randint(10, 1000, (length,)).tolist()
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:]})
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        padded = model(**collator(TrainConfig(), real_tokenizer)(features), use_cache=False).loss.item()
        packed = model(
            **collator(TrainConfig(packing=True), real_tokenizer)(features), use_cache=False
        ).loss.item()
    exact = packed == pytest.approx(padded, rel=1e-5)
    assert exact == ARCHITECTURES[model_type].packs_exactly
    if not exact:
        args = _args(base, adapters_dir, chat_file)
        assert main([*args, "--name", "packed", "--packing"]) == EXIT_CONFIG
        assert "packing is not exact on this OPT base" in capsys.readouterr().err
        assert not (adapters_dir / "packed").exists()
