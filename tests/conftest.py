"""Shared fixtures: the real embedded base model, a tiny random model built from its config, volumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The openai client honours proxy variables; tests only ever talk to loopback.
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def real_base():
    """The embedded SmolLM2-135M-Instruct, converted once into the cache."""
    from lorayard.base_model import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def real_tokenizer(real_base):
    from lorayard.base_model import load_tokenizer

    return load_tokenizer(real_base)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, real_base, real_tokenizer) -> Path:
    """A tiny random Llama with the real tokenizer and chat template, as a local HF folder.

    Same architecture family and vocabulary as the real base, 2 layers and a narrow width, so unit
    tests run in seconds; built from the real config so shapes follow the same rules.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(real_base.path)
    config.update(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 512,
        }
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(folder, safe_serialization=True)
    real_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tiny_base_dir):
    from lorayard.base_model import resolve_base_model

    return resolve_base_model(str(tiny_base_dir))


@pytest.fixture
def adapters_dir(tmp_path) -> Path:
    folder = tmp_path / "adapters"
    folder.mkdir()
    return folder
