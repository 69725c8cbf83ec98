"""Reading and validating an adapter folder: the half of the volume contract about file contents.

Both sides call :func:`load_adapter`: the training job on the staged folder before it publishes (the
serving-compatibility check), the server when it loads an adapter. So whatever the job publishes, the
server can serve. Like vLLM's ``PEFTHelper``, the config is validated before any weight is read, and
only safetensors are ever read (a pickled ``adapter_model.bin`` is refused, never unpickled).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorayard.architectures import ARCHITECTURES, architecture_for, linear_shapes
from lorayard.volume import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

# The linear layers of a Llama-family decoder block that LoRA may target, as PEFT names them (each
# architecture's own list: lorayard.architectures).
TARGETABLE_MODULES = ARCHITECTURES["llama"].lora_targets

# PEFT's keys: base_model.model.<the architecture's layers path>.<layer>.<path in the block>.lora_A...
_KEY_RE = re.compile(
    r"^base_model\.model\.(?P<layers>[\w.]+?)\.(?P<layer>\d+)\."
    r"(?P<module>[\w.]+?)\."
    r"(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?:\.default)?(?:\.weight)?$"
)


class AdapterFormatError(ValueError):
    """The adapter folder cannot be served by this base model; the message names the problem."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: ``y = W x + scaling * B (A x)``; DoRA rescales rows by ``magnitude``.

    a: [rank, in_features]; b: [out_features, rank]; magnitude: [out_features] or None.
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter, keyed by (layer index, short module name such as ``q_proj``)."""

    config: dict[str, Any]
    modules: dict[tuple[int, str], LoraModule] = field(repr=False)

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        """The targeted linears as PEFT names them (GPT-2's ``attn.c_proj`` is ``c_proj``)."""
        return sorted({name.rsplit(".", 1)[-1] for _, name in self.modules})

    @property
    def uses_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())


def expected_linear_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each targetable linear layer of the base's architecture."""
    return linear_shapes(config)


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """Read and validate ``adapter_config.json`` without touching weights."""
    file = folder / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"{file} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{file} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(
            f"{file}: peft_type {config.get('peft_type')!r} is not supported (only LORA)"
        )
    if config.get("modules_to_save"):
        raise AdapterFormatError(
            f"{file}: modules_to_save={config['modules_to_save']} is not supported "
            f"(fully trained modules such as a resized vocabulary cannot be shared by adapters)"
        )
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{file}: bias={config['bias']!r} is not supported (use 'none')")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, int | float) or value <= 0:
            raise AdapterFormatError(f"{file}: {key} must be a positive number, got {value!r}")
    return config


def _pattern_value(patterns: dict[str, Any], module_path: str, default: float) -> float:
    # PEFT matches rank_pattern / alpha_pattern keys against the end of the module's dotted path.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return float(value)
    return default


def load_adapter(
    folder: Path, base_config: PretrainedConfig, *, device: str = "cpu", dtype: torch.dtype | None = None
) -> AdapterWeights:
    """Validate config, then read the safetensors and check every tensor against the base shapes."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_adapter_config(folder)
    weights_file = folder / ADAPTER_WEIGHTS_FILE
    if not weights_file.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise AdapterFormatError(
            f"{weights_file} is missing"
            + (
                "; adapter_model.bin is a pickle and is never loaded: convert it to safetensors"
                if pickled
                else ""
            )
        )
    try:
        tensors = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{weights_file} is not a readable safetensors file: {exc}") from exc

    arch = architecture_for(base_config)
    shapes = expected_linear_shapes(base_config)
    key_of_path = {path: key for key, path in arch.linear_paths.items()}
    layers = base_config.num_hidden_layers
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if not match:
            raise AdapterFormatError(
                f"{weights_file}: unsupported tensor {key!r} (only LoRA on decoder linears)"
            )
        layer = int(match["layer"])
        if match["layers"] != arch.layers_path or match["module"] not in key_of_path:
            raise AdapterFormatError(
                f"{weights_file}: {key} targets {match['module']}, which a {arch.name} base does not have "
                f"(its LoRA targets: {', '.join(arch.lora_targets)})"
            )
        if layer >= layers:
            raise AdapterFormatError(f"{weights_file}: {key} targets layer {layer}; the base has {layers}")
        parts.setdefault((layer, match["module"]), {})[match["kind"]] = tensor

    alpha = float(config["lora_alpha"])
    use_rslora = bool(config.get("use_rslora", False))
    target_dtype = dtype or torch.float32
    modules: dict[tuple[int, str], LoraModule] = {}
    for (layer, module_path), found in sorted(parts.items()):
        short = key_of_path[module_path]
        if "lora_A" not in found or "lora_B" not in found:
            raise AdapterFormatError(f"{weights_file}: layer {layer} {module_path} lacks lora_A or lora_B")
        a, b = found["lora_A"], found["lora_B"]
        in_features, out_features = shapes[short]
        rank = a.shape[0] if a.ndim == 2 else -1
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise AdapterFormatError(
                f"{weights_file}: layer {layer} {module_path} has A{tuple(a.shape)} B{tuple(b.shape)}, "
                f"expected A(r, {in_features}) B({out_features}, r): adapter and base do not fit"
            )
        full_path = f"{arch.layers_path}.{layer}.{module_path}"
        module_alpha = _pattern_value(config.get("alpha_pattern", {}), full_path, alpha)
        scaling = module_alpha / math.sqrt(rank) if use_rslora else module_alpha / rank
        magnitude = found.get("lora_magnitude_vector")
        if magnitude is not None:
            magnitude = magnitude.reshape(-1)
            if magnitude.shape != (out_features,):
                raise AdapterFormatError(f"{weights_file}: layer {layer} {module_path} DoRA magnitude shape")
        if not all(torch.isfinite(t).all() for t in (a, b)):
            raise AdapterFormatError(f"{weights_file}: layer {layer} {module_path} holds NaN or inf")
        modules[(layer, short)] = LoraModule(
            a=a.to(device=device, dtype=target_dtype).contiguous(),
            b=b.to(device=device, dtype=target_dtype).contiguous(),
            scaling=scaling,
            magnitude=None if magnitude is None else magnitude.to(device=device, dtype=target_dtype),
        )
    if not modules:
        raise AdapterFormatError(f"{weights_file} holds no LoRA tensors")
    return AdapterWeights(config=config, modules=modules)
