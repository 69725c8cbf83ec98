"""Hostile adapter folders: what a careless or malicious writer of the volume could leave there.

Each builder starts from a valid random adapter (``random_adapter.build_random_adapter``) and breaks
one thing, so a test or a fuzz run can mix them with valid ones and expect each to be
refused with a 4xx naming the field (``HOSTILE_FIELDS``) while everything else keeps working.

    build_hostile_adapter("regex_pattern", base, out)   # and "infinite_alpha", "rank_zero", ...
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorayard.testing.random_adapter import build_random_adapter
from lorayard.volume import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

CATASTROPHIC_PATTERN = "(.*)*(.*)*y"
"""The issue-23 pattern: Python's ``re`` backtracks on it for hours, holding the GIL."""

REGEX_TIMEOUT_PATTERN = r"(\w|\w\w|.)*y"
"""A pattern even the ``regex`` module cannot match in bounded time on a module name."""


def _edit_config(folder: Path, **changes: Any) -> None:
    file = folder / ADAPTER_CONFIG_FILE
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def _regex_pattern(folder: Path, outside: Path) -> None:
    _edit_config(folder, alpha_pattern={CATASTROPHIC_PATTERN: 8})


def _slow_pattern(folder: Path, outside: Path) -> None:
    _edit_config(folder, rank_pattern={REGEX_TIMEOUT_PATTERN: 4})


def _target_regex(folder: Path, outside: Path) -> None:
    _edit_config(folder, target_modules=REGEX_TIMEOUT_PATTERN)


def _infinite_alpha(folder: Path, outside: Path) -> None:
    # json.dumps writes float("inf") as Infinity, which json.loads (and PEFT) read back.
    _edit_config(folder, lora_alpha=float("inf"))


def _huge_alpha(folder: Path, outside: Path) -> None:
    _edit_config(folder, lora_alpha=1e308)


def _nan_alpha(folder: Path, outside: Path) -> None:
    _edit_config(folder, lora_alpha=float("nan"))


def _rank_zero(folder: Path, outside: Path) -> None:
    _edit_config(folder, r=0)


def _overflowing_scale(folder: Path, outside: Path) -> None:
    # Finite alpha, finite B, but alpha / r * B is past float32's range.
    from safetensors.torch import load_file, save_file

    file = folder / ADAPTER_WEIGHTS_FILE
    tensors = {k: v * 1e6 if "lora_B" in k else v for k, v in load_file(str(file)).items()}
    save_file(tensors, str(file))
    _edit_config(folder, lora_alpha=3e38)


def _symlinked_weights(folder: Path, outside: Path) -> None:
    """The weights file is a symlink to a file outside the volume (a copy of the real one)."""
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / "stolen.safetensors"
    (folder / ADAPTER_WEIGHTS_FILE).replace(target)
    os.symlink(target, folder / ADAPTER_WEIGHTS_FILE)


def _symlinked_config(folder: Path, outside: Path) -> None:
    """The config is a symlink to a file outside the volume, whose values must never be echoed."""
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / "secret.json"
    target.write_text(json.dumps({"r": "SECRET-VALUE", "lora_alpha": "SECRET-VALUE"}))
    (folder / ADAPTER_CONFIG_FILE).unlink()
    os.symlink(target, folder / ADAPTER_CONFIG_FILE)


HOSTILE: dict[str, Callable[[Path, Path], None]] = {
    "regex_pattern": _regex_pattern,
    "slow_pattern": _slow_pattern,
    "target_regex": _target_regex,
    "infinite_alpha": _infinite_alpha,
    "huge_alpha": _huge_alpha,
    "nan_alpha": _nan_alpha,
    "rank_zero": _rank_zero,
    "overflowing_scale": _overflowing_scale,
    "symlinked_weights": _symlinked_weights,
    "symlinked_config": _symlinked_config,
}
"""kind -> what it does to a valid adapter folder (given the folder and a place outside the volume)."""

HOSTILE_FIELDS: dict[str, str] = {
    "regex_pattern": "",  # matched safely: PEFT's semantics give no module this pattern; loads fine
    "slow_pattern": "rank_pattern",
    "target_regex": "target_modules",
    "infinite_alpha": "lora_alpha",
    "huge_alpha": "lora_alpha",
    "nan_alpha": "lora_alpha",
    "rank_zero": "r",
    "overflowing_scale": "lora_alpha",
    "symlinked_weights": "outside the adapters volume",
    "symlinked_config": "outside the adapters volume",
}
"""kind -> what the refusal's message names ("" for a kind that must load and serve normally)."""


def build_hostile_adapter(
    kind: str, base: Any, out: Path, *, outside: Path | None = None, seed: int = 0, rank: int = 4
) -> Path:
    """A plain adapter folder at ``out`` broken as ``kind`` (a key of HOSTILE); ``outside``: a folder
    outside the volume for the symlink kinds (default: ``out``'s grandparent / "outside-<name>").
    ``base``: a model folder or a loaded model, as for build_random_adapter (a loaded model is
    left with the LoRA attached: pass a folder unless you unload it)."""
    build_random_adapter(base, out, seed, r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    HOSTILE[kind](out, outside or out.parent.parent / f"outside-{out.name}")
    return out
