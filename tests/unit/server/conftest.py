"""Fixtures for engine/registry unit tests: random PEFT adapters on the tiny base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorayard.server.engine.engine import Engine
from lorayard.server.settings import Settings
from lorayard.testing.random_adapter import build_random_adapter

# Different ranks and target modules on purpose: one batch must mix them.
ADAPTER_SPECS: dict[str, dict] = {
    "qv4": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "all8": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    "mlp16": {
        "r": 16,
        "lora_alpha": 8,
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "use_rslora": True,
    },
    "dora8": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "o_proj", "down_proj"],
        "use_dora": True,
    },
}


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base_dir, tmp_path_factory) -> Path:
    """A volume of plain PEFT folders, one per ADAPTER_SPECS entry."""
    root = tmp_path_factory.mktemp("tiny-adapters")
    for seed, (name, spec) in enumerate(ADAPTER_SPECS.items()):
        # b_scale 4: big enough that adapters visibly disagree with the base
        build_random_adapter(tiny_base_dir, root / name, seed, b_scale=4.0, **spec)
    return root


@pytest.fixture
def make_engine(tiny_base, test_device, test_decode_mode):
    """Engines on the tiny base, stopped at teardown: float32 on any device, so greedy output can be
    compared token for token with PEFT's (on the CPU)."""
    engines: list[Engine] = []

    def make(*, fuse_linears=None, eos_token_ids=(), guided=None, **settings) -> Engine:
        """``settings``: server Settings fields; ``guided``: a grammar compiler, as the runtime sets."""
        settings.setdefault("decode_mode", test_decode_mode)
        config = Settings(device=test_device, **settings).engine_config()
        engine = Engine.from_base(
            tiny_base,
            config,
            dtype=torch.float32,
            eos_token_ids=set(eos_token_ids),
            fuse_linears=fuse_linears,
        )
        engine.guided = guided
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@pytest.fixture
def engine(make_engine) -> Engine:
    return make_engine(max_batch_size=8, max_model_len=256)


def peft_greedy(
    base_dir: Path,
    adapter_dir: Path | None,
    prompt: list[int],
    max_new_tokens: int,
    bias: list[tuple[int, float]] | None = None,
    dtype: torch.dtype = torch.float32,
    **load_kwargs,
) -> list[int]:
    """The reference: plain PEFT (or the plain base) generate, do_sample=False; ``bias``: single-token
    logit biases through HF's own SequenceBiasLogitsProcessor; ``dtype``: the base's (and so the
    adapter's) dtype."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, **load_kwargs)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            sequence_bias={(token,): value for token, value in bias} if bias else None,
        )
    return out[0, len(prompt) :].tolist()
