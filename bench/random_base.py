"""A base model with random weights, built from a real one's config and tokenizer.

Two uses: the tiny 2-layer model that unit tests and quick soaks run on (``--tiny``), and a full-size
stand-in where the real weights cannot travel (the GPU machine receives at most 64 MiB; the embedded
GGUF alone is 98 MB). Same shapes means the same speed, so benchmarks on it are fair; only what the
model says is noise.

    python -m bench.random_base OUT [--like FOLDER] [--tiny]
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


def build_random_base(like: Path, out: Path, overrides: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Write a float32 random-weight model with ``like``'s config (plus ``overrides``) and tokenizer.

    ``like`` needs only config and tokenizer files, no weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(like)
    config.update(overrides or {})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(like).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--like", type=Path, default=None, help="config source (default: the default base)")
    parser.add_argument("--tiny", action="store_true", help="2 layers, width 64 (the unit tests' model)")
    args = parser.parse_args()
    if args.like is None:
        from lorayard.base_model import resolve_base_model

        args.like = resolve_base_model().path
    print(build_random_base(args.like, args.out, TINY if args.tiny else None))


if __name__ == "__main__":
    main()
