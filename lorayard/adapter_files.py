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

from lorayard.adapter_patterns import ModulePatterns, PatternRefused
from lorayard.architectures import ARCHITECTURES, architecture_for, language_config, linear_shapes
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


_UNSUPPORTED_FIELDS = {
    "modules_to_save": "fully trained modules such as a resized vocabulary cannot be shared by adapters",
    "target_parameters": "LoRA on bare parameters (MoE experts) is not served",
    "layer_replication": "replicated layers are not served",
    "trainable_token_indices": "trained token embeddings cannot be shared by adapters",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not served",
    "arrow_config": "Arrow routing is not served",
    "lora_bias": "LoRA biases are not served",
    "use_qalora": "QALoRA pooling is not served",
}
"""Config fields that change what the adapter computes in ways we do not serve: refused when set, so
an adapter is never answered as plain LoRA when PEFT would do something else."""

FLOAT32_MAX = 3.4028234663852886e38


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """Read and validate ``adapter_config.json`` without touching weights.

    Messages name the file and the field, never the folder: they reach clients, and where the volume
    lives on the server is none of theirs."""
    file = folder / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"{ADAPTER_CONFIG_FILE} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterFormatError(f"{ADAPTER_CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{ADAPTER_CONFIG_FILE} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{ADAPTER_CONFIG_FILE}: peft_type is not supported (only LORA)")
    for key, why in _UNSUPPORTED_FIELDS.items():
        if config.get(key):
            raise AdapterFormatError(f"{ADAPTER_CONFIG_FILE}: {key} is not supported ({why})")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{ADAPTER_CONFIG_FILE}: bias is not supported (use 'none')")
    _check_rank("r", config.get("r"))
    _check_alpha("lora_alpha", config.get("lora_alpha"))
    for key, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise AdapterFormatError(f"{ADAPTER_CONFIG_FILE}: {key} must be an object of pattern -> value")
        for value in patterns.values():
            check(key, value)
    return config


def _check_rank(field: str, value: Any) -> None:
    # PEFT's ranks are ints; a rank of 0 makes the scaling alpha / 0.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterFormatError(f"{ADAPTER_CONFIG_FILE}: {field} must be a positive integer, got {value!r}")


def _check_alpha(field: str, value: Any) -> None:
    # json.loads accepts Infinity and NaN; 1e308 is finite in Python but not in float32.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= FLOAT32_MAX
    ):
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG_FILE}: {field} must be a positive finite number (float32), got {value!r}"
        )


def load_adapter(
    folder: Path, base_config: PretrainedConfig, *, device: str = "cpu", dtype: torch.dtype | None = None
) -> AdapterWeights:
    """Validate config, then read the safetensors and check every tensor against the base shapes and
    against what PEFT would build from the config (targets, rank, alpha: :mod:`lorayard.adapter_patterns`)."""
    import torch

    folder = Path(folder)
    config = read_adapter_config(folder)
    arch = architecture_for(base_config)
    shapes = expected_linear_shapes(base_config)
    try:
        patterns = ModulePatterns(config, arch.lora_targets)
    except PatternRefused as exc:
        raise AdapterFormatError(f"{ADAPTER_CONFIG_FILE}: {exc}") from exc
    parts = _read_parts(folder, base_config)
    target_dtype = dtype or torch.float32
    modules: dict[tuple[int, str], LoraModule] = {}
    for (layer, short), found in sorted(parts.items()):
        module_path = f"{arch.layers_path}.{layer}.{arch.linear_paths[short]}"
        try:
            module = _lora_module(config, patterns, module_path, shapes[short], found)
        except PatternRefused as exc:
            raise AdapterFormatError(f"{ADAPTER_CONFIG_FILE}: {exc}") from exc
        modules[(layer, short)] = LoraModule(
            a=module.a.to(device=device, dtype=target_dtype).contiguous(),
            b=module.b.to(device=device, dtype=target_dtype).contiguous(),
            scaling=module.scaling,
            magnitude=None
            if module.magnitude is None
            else module.magnitude.to(device=device, dtype=target_dtype),
        )
    if not modules:
        raise AdapterFormatError(f"{ADAPTER_WEIGHTS_FILE} holds no LoRA tensors")
    return AdapterWeights(config=config, modules=modules)


def _read_parts(
    folder: Path, base_config: PretrainedConfig
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """(layer, the linear's short key: ``q_proj``, ``c_attn``...) -> {lora_A, lora_B,
    lora_magnitude_vector: tensor}."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_file = folder / ADAPTER_WEIGHTS_FILE
    if not weights_file.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise AdapterFormatError(
            f"{ADAPTER_WEIGHTS_FILE} is missing"
            + (
                "; adapter_model.bin is a pickle and is never loaded: convert it to safetensors"
                if pickled
                else ""
            )
        )
    try:
        tensors = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        message = str(exc).replace(str(folder), "<adapter>")
        raise AdapterFormatError(
            f"{ADAPTER_WEIGHTS_FILE} is not a readable safetensors file: {message}"
        ) from exc
    arch = architecture_for(base_config)
    key_of_path = {path: key for key, path in arch.linear_paths.items()}
    layers = language_config(base_config).num_hidden_layers
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if not match:
            raise AdapterFormatError(
                f"{ADAPTER_WEIGHTS_FILE}: unsupported tensor {key[:200]!r} (only LoRA on decoder linears)"
            )
        layer = int(match["layer"])
        if arch.vision and match["layers"] != arch.layers_path:
            raise AdapterFormatError(
                f"{ADAPTER_WEIGHTS_FILE}: {key} adapts the vision tower, which is not served (LoRA on the "
                f"language model only: target its {', '.join(arch.lora_targets)})"
            )
        if match["layers"] != arch.layers_path or match["module"] not in key_of_path:
            raise AdapterFormatError(
                f"{ADAPTER_WEIGHTS_FILE}: {key} targets {match['module']}, which a {arch.name} base does not "
                f"have (its LoRA targets: {', '.join(arch.lora_targets)})"
            )
        if layer >= layers:
            raise AdapterFormatError(
                f"{ADAPTER_WEIGHTS_FILE}: {key} targets layer {layer}; the base has {layers}"
            )
        parts.setdefault((layer, key_of_path[match["module"]]), {})[match["kind"]] = tensor
    return parts


def _lora_module(
    config: dict[str, Any],
    patterns: ModulePatterns,
    full_path: str,
    shape: tuple[int, int],
    found: dict[str, torch.Tensor],
) -> LoraModule:
    """One module's tensors (``full_path``: its PEFT module name; ``shape``: the base linear's in and
    out features), checked against the config as PEFT reads it, with its scaling (float32)."""
    import torch

    where = f"{ADAPTER_WEIGHTS_FILE}: {full_path}"
    if not patterns.targets(full_path):
        # PEFT would not put a LoRA layer here and would drop these tensors: serving them would not
        # be the adapter PEFT loads.
        raise AdapterFormatError(f"{where} is not among the modules target_modules selects")
    if "lora_A" not in found or "lora_B" not in found:
        raise AdapterFormatError(f"{where} lacks lora_A or lora_B")
    a, b = found["lora_A"], found["lora_B"]
    in_features, out_features = shape
    rank = a.shape[0] if a.ndim == 2 else -1
    if a.shape != (rank, in_features) or b.shape != (out_features, rank):
        raise AdapterFormatError(
            f"{where} has A{tuple(a.shape)} B{tuple(b.shape)}, "
            f"expected A(r, {in_features}) B({out_features}, r): adapter and base do not fit"
        )
    config_rank, rank_field = patterns.rank(full_path, config["r"])
    if rank != config_rank:
        raise AdapterFormatError(f"{where} has rank {rank}, but {rank_field} gives it rank {config_rank}")
    alpha, alpha_field = patterns.alpha(full_path, config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank
    magnitude = found.get("lora_magnitude_vector")
    if (magnitude is not None) != bool(config.get("use_dora", False)):
        raise AdapterFormatError(
            f"{where}: use_dora is {bool(config.get('use_dora', False))} but the DoRA magnitude is "
            f"{'present' if magnitude is not None else 'missing'}"
        )
    if magnitude is not None:
        magnitude = magnitude.reshape(-1)
        if magnitude.shape != (out_features,):
            raise AdapterFormatError(f"{where}: DoRA magnitude has shape {tuple(magnitude.shape)}")
        if not torch.isfinite(magnitude.float()).all():
            raise AdapterFormatError(f"{where}: lora_magnitude_vector holds NaN or inf")
    if not all(torch.isfinite(t.float()).all() for t in (a, b)):
        raise AdapterFormatError(f"{where} holds NaN or inf")
    # What the engine computes with: scaling * B in float32 must stay finite (alpha 1e30 times a
    # large B overflows even though each is finite).
    if not torch.isfinite(b.float() * scaling).all():
        raise AdapterFormatError(f"{where}: {alpha_field} {alpha!r} times lora_B overflows float32")
    return LoraModule(a=a, b=b, scaling=scaling, magnitude=magnitude)
