"""Write random PEFT LoRA adapters (plain PEFT folders) on the real base model, for load tests.

Random, non-zero LoRA weights cost exactly what trained ones cost to serve (same rank, same target
modules), so a load test does not need the training job. Usage: python make_random_adapters.py DIR a b
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from lorayard.base_model import load_base_model, resolve_base_model


def main() -> None:
    folder, names = Path(sys.argv[1]), sys.argv[2:]
    base = resolve_base_model()
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = load_base_model(base, device="cpu", dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(folder / name, safe_serialization=True)
        print(folder / name)


if __name__ == "__main__":
    main()
