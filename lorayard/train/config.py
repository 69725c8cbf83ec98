"""TrainConfig: every setting of a training run, its default and its meaning, in one place.

A run's config comes from three layers, later ones winning: the field defaults below, a YAML file
(``--config``; the bundled persona demo when none is given), and CLI overrides. Relative paths in a
YAML file are relative to that file, so a config and its data travel together. The resolved config
(every default filled in, paths absolute) is what ``--print-config`` shows and what the manifest stores.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorayard.base_model import Quantization, default_base_model
from lorayard.flags import add_field_flags, flags_table
from lorayard.storage import is_object_store, location_value
from lorayard.tool_format import ToolFormatName
from lorayard.volume import STAGING_DIR, InvalidAdapterName, validate_name

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_DATA_DIR = PACKAGE_DIR / "demo_data"
CONFIGS_DIR = PACKAGE_DIR / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "persona.yaml"
"""Used when no ``--config`` is given: the persona demo."""

ENV_ADAPTERS_DIR = "LORAYARD_ADAPTERS_DIR"
DEFAULT_ADAPTERS_DIR = Path("adapters")
RUNS_DIR = "runs"
"""Checkpoints live in ``<adapters-dir>/.staging/runs/<name>``: on the volume (so a rescheduled pod
finds them for ``--resume``) but outside what the server reads."""
LOCAL_RUNS_DIR = Path(tempfile.gettempdir()) / "lorayard-runs"
"""With adapters on an object store, checkpoints default to ``$TMPDIR/lorayard-runs/<name>`` (set
``output_dir`` to a persistent folder to resume in another pod or after a reboot)."""

DataFormat = Literal["auto", "alpaca", "text_target", "prompt_completion", "messages", "sharegpt"]


class ConfigError(ValueError):
    """The config cannot be used; the message names the key or flag to change."""


class TrainConfig(BaseModel):
    """One training run. Field descriptions are the documentation (README table, ``--help``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- what and where ----------------------------------------------------------------------------
    name: str = Field("adapter", description="adapter name on the volume (1-64 letters, digits, . _ -)")
    adapters_dir: Path | str | None = Field(
        None,
        description=f"the adapters volume: a folder or s3://bucket/prefix; default ${ENV_ADAPTERS_DIR}, "
        "else ./adapters",
    )
    base_model: str | None = Field(
        None,
        description="alias, local HF folder or hub id; default $LORAYARD_BASE_MODEL or the embedded model",
    )
    output_dir: Path | None = Field(
        None, description=f"checkpoints of this run; default <adapters_dir>/{STAGING_DIR}/{RUNS_DIR}/<name>"
    )
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ...; default cuda when available")

    # -- data --------------------------------------------------------------------------------------
    data: list[Path] = Field(
        default_factory=list, description="training files: .jsonl, .json (a list) or .csv; required"
    )
    val_data: list[Path] = Field(
        default_factory=list, description="validation files; default: a seeded split of `data`"
    )
    data_format: DataFormat = Field(
        "auto",
        description="alpaca | text_target | prompt_completion | messages | sharegpt; auto: detected per file",
    )
    system_prompt: str | None = Field(
        None,
        description="system message added to non-chat formats; default: none (the template's own default)",
    )
    prompt_template: str | None = Field(
        None,
        description="Jinja chat template (HF's format) for chat-style data; default: the base's own, or "
        "for a base without one lorayard.chat_format.DEFAULT_PROMPT_TEMPLATE (text/target and "
        "prompt/completion rows then train as raw prompt + completion + EOS). Recorded in the "
        "manifest; the server renders this adapter's chat requests with it",
    )
    tool_call_format: ToolFormatName | None = Field(
        None,
        description="how tool calls are written in the training text: hermes, llama3_json or mistral "
        "(default: recognised from the chat template; hermes for a template without tools support, as the "
        "server's --tool-call-format). A template that writes its calls in another format is refused. "
        "Recorded in the manifest; the server serves this adapter's tool calls in it",
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="share of examples held out when no val_data is given"
    )
    max_length: int = Field(
        256, ge=16, description="longest example in tokens; longer ones are reported as errors"
    )
    max_data_errors: int = Field(20, ge=1, description="how many bad records to list before stopping")

    # -- LoRA --------------------------------------------------------------------------------------
    rank: int = Field(16, ge=1, description="LoRA rank r")
    lora_alpha: float = Field(
        32, gt=0, description="LoRA alpha; scaling is alpha/r (alpha/sqrt(r) with rsLoRA)"
    )
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description='decoder linears to adapt (flag: a comma list), or "all-linear" (all of them)',
    )
    layers_to_transform: list[int] | None = Field(None, description="only these layer indices; default all")
    use_rslora: bool = Field(False, description="rank-stabilized LoRA (scaling alpha/sqrt(r))")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    quantization: Quantization = Field(
        None, description="QLoRA: load the base in 4bit (NF4, double quant) or 8bit via bitsandbytes"
    )

    # -- optimisation ------------------------------------------------------------------------------
    epochs: float = Field(3.0, gt=0, description="passes over the training data (when max_steps is unset)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after warmup"
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    batch_size: int = Field(8, ge=1, description="examples per device per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory")
    packing: bool = Field(
        False,
        description="padding-free micro-batches: examples concatenated into one row, attention kept "
        "within each example, so no compute is spent on padding",
    )
    seed: int = Field(42, description="seed for the split, LoRA init, dropout and data order")
    fsdp: bool = Field(
        False,
        description="shard the base across the processes of a torchrun / accelerate launch run (FSDP2 at "
        "load time: each rank reads and holds only its shard); the adapter is replicated, its gradients "
        "averaged; rank 0 alone evaluates and publishes. Not with quantization or --resume",
    )

    # -- evaluation, checkpoints, reporting ---------------------------------------------------------
    eval_steps: int = Field(10, ge=1, description="evaluate (loss, perplexity) every N steps")
    save_steps: int | None = Field(
        None, ge=1, description="checkpoint every N steps; default eval_steps (must be a multiple of it)"
    )
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept (the best one is always kept)")
    logging_steps: int = Field(5, ge=1, description="log train loss every N steps")
    load_best_model_at_end: bool = Field(True, description="publish the checkpoint with the lowest eval loss")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after N evaluations without improvement; default off"
    )
    report_to: list[Literal["wandb", "tensorboard"]] = Field(
        default_factory=list, description="experiment trackers; default none"
    )
    eval_prompts: int = Field(
        4, ge=0, description="held-back validation prompts answered by base and adapter"
    )
    eval_max_new_tokens: int = Field(48, ge=1, description="greedy tokens per held-back prompt")
    publish_if_better: bool = Field(
        False, description="refuse to publish when validation loss is worse than LATEST's"
    )

    _location = field_validator("adapters_dir", mode="before")(location_value)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        try:
            return validate_name(value)
        except InvalidAdapterName as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _save_fits_eval(self) -> TrainConfig:
        # Trainer can only keep the best checkpoint when every save coincides with an evaluation.
        if self.save_steps is not None and self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps={self.save_steps} must be a multiple of eval_steps={self.eval_steps}"
            )
        return self

    @model_validator(mode="after")
    def _fsdp_shards_floats(self) -> TrainConfig:
        # transformers' load-time FSDP shards float weights; bitsandbytes' quantized ones are not
        # shardable that way, and a run we cannot do exactly is refused rather than run unsharded.
        if self.fsdp and self.quantization:
            raise ValueError(
                "fsdp cannot shard quantized weights: drop quantization (the base is sharded instead), "
                "or train QLoRA on one GPU per run"
            )
        return self

    # -- derived values ----------------------------------------------------------------------------
    @property
    def checkpoint_steps(self) -> int:
        return self.save_steps or self.eval_steps

    @property
    def run_dir(self) -> Path:
        assert self.output_dir is not None, "resolve() fills output_dir"
        return self.output_dir

    @property
    def volume_dir(self) -> Path | str:
        """A local folder, or an ``s3://bucket/prefix`` string."""
        assert self.adapters_dir is not None, "resolve() fills adapters_dir"
        return self.adapters_dir

    def resolved(self) -> TrainConfig:
        """A copy with every environment-dependent default filled in and every path absolute."""
        adapters_dir = adapters_location(self.adapters_dir)
        if isinstance(adapters_dir, str):
            default_output = LOCAL_RUNS_DIR / self.name
        else:
            default_output = adapters_dir / STAGING_DIR / RUNS_DIR / self.name
        output_dir = (self.output_dir or default_output).absolute()
        resolved = self.model_copy(
            update={
                "adapters_dir": adapters_dir,
                "output_dir": output_dir,
                "base_model": self.base_model or default_base_model(),
                "data": [p.absolute() for p in self.data],
                "val_data": [p.absolute() for p in self.val_data],
            }
        )
        if not resolved.data:
            raise ConfigError("no training data: set `data` in the config or pass --data FILE")
        return resolved

    def to_jsonable(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def adapters_location(value: Path | str | None) -> Path | str:
    """The adapters volume: ``value``, else $LORAYARD_ADAPTERS_DIR, else ./adapters; folders absolute."""
    location = value or os.environ.get(ENV_ADAPTERS_DIR) or DEFAULT_ADAPTERS_DIR
    return location if is_object_store(location) else Path(location).absolute()


def _format_validation_error(exc: ValidationError, source: str) -> str:
    known = sorted(TrainConfig.model_fields)
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(config)"
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(error["loc"][0]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"
            lines.append(f"{source}: unknown key {key!r}{hint}")
        else:
            lines.append(f"{source}: {key}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)


def _relative_to(folder: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """Paths in a YAML file are relative to the file's folder."""
    out = dict(raw)
    for key in ("data", "val_data"):
        if key in out and out[key] is not None:
            values = out[key] if isinstance(out[key], list) else [out[key]]
            out[key] = [os.path.normpath(folder / v) if isinstance(v, str) else v for v in values]
    for key in ("adapters_dir", "output_dir"):
        if isinstance(out.get(key), str):
            out[key] = os.path.normpath(folder / out[key])
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file, paths made relative to it."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    return _relative_to(path.resolve().parent, raw)


FLAG_ALIASES: dict[str, tuple[str, ...]] = {"data_format": ("--format",), "lora_alpha": ("--alpha",)}
"""The short spellings the job's flags were first given (scripts use them) beside ``--data-format`` and
``--lora-alpha``: every other flag is its field's name."""


def comma_list(value: str) -> list[str] | str:
    """``q_proj,v_proj`` -> a list; ``all-linear`` stays as it is."""
    return value if value == "all-linear" else [v.strip() for v in value.split(",") if v.strip()]


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """A flag per TrainConfig field (``--max-steps``, ``--use-dora`` / ``--no-use-dora``...), default None."""
    add_field_flags(
        parser, TrainConfig.model_fields, aliases=FLAG_ALIASES, parse={"target_modules": comma_list}
    )


def flags_markdown() -> str:
    """The training job's config flags as a markdown table (flag, default, meaning), from TrainConfig."""
    return flags_table(TrainConfig.model_fields, aliases=FLAG_ALIASES)


def load_config(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """YAML file (or the persona demo) + CLI overrides -> a validated, resolved TrainConfig."""
    path = path or DEFAULT_CONFIG
    values = read_config_file(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = TrainConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(path))) from exc
    return config.resolved()
