"""Random LoRA adapters, saved by PEFT itself: the one builder that tests, benchmarks and the soak share.

Random, non-zero LoRA weights cost exactly what trained ones cost to serve (same rank, same target
modules), so a benchmark or a load test needs no training run; what such an adapter says is noise.

    python -m lorayard.testing.random_adapter OUT NAME... [--base SPEC] [--rank 8] [--targets q_proj,v_proj]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def build_random_adapter(
    base: Path | PreTrainedModel, out: Path, seed: int, *, b_scale: float = 1.0, **lora: Any
) -> PeftModel:
    """Save a random LoRA (``lora``: PEFT ``LoraConfig`` fields) to ``out``; returns the PEFT model.

    ``init_lora_weights=False`` makes B non-zero so the adapter changes outputs; ``b_scale`` sets how
    much (small: still sensible text; large: clearly different). ``base`` is a model folder (loaded in
    float32) or a loaded model, which gets the LoRA layers attached in place: ``.unload()`` the result
    to have the plain base back for the next adapter.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if isinstance(base, Path):
        base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora))
    if b_scale != 1.0:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(b_scale)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return peft_model


def peft_reference(
    base_path: Path, adapter_dir: Path | None, tokenizer: Any, question: str, max_new_tokens: int
) -> str:
    """Plain PEFT's greedy answer to one chat question (float32): what a server's greedy output must
    equal, whichever engine serves it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorayard.chat_format import render_prompt

    model: Any = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = render_prompt(tokenizer, [{"role": "user", "content": question}])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write OUT/NAME/ into")
    parser.add_argument("names", nargs="+", help="one adapter per name (seeds 0, 1, ...)")
    parser.add_argument("--base", default=None, help="base model spec (default: the default base)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha is twice the rank)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma list of modules, or all-linear")
    args = parser.parse_args()
    import torch

    from lorayard.base_model import load_base_model, resolve_base_model

    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    model = load_base_model(resolve_base_model(args.base), device="cpu", dtype=torch.float32)
    for seed, name in enumerate(args.names):
        peft_model = build_random_adapter(
            model, args.out / name, seed, r=args.rank, lora_alpha=2 * args.rank, target_modules=targets
        )
        model = peft_model.unload()
        print(args.out / name)


if __name__ == "__main__":
    main()
