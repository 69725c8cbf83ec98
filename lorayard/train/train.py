"""LoRA / QLoRA training on transformers' Trainer: PEFT setup, completion-only loss, resume, SIGTERM.

We lean on Trainer (and through it accelerate) for the loop, gradient accumulation, schedules,
checkpoints, ``resume_from_checkpoint`` (optimizer, scheduler, RNG and data position), evaluation,
best-checkpoint selection, early stopping, trackers and multi-process runs (``torchrun`` /
``accelerate launch``). What is ours: the data collation, the PEFT config, the SIGTERM callback and
the run-folder bookkeeping.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lorayard.base_model import ResolvedBaseModel, default_device, default_dtype, load_base_model
from lorayard.vision import IMAGE_PAD

if TYPE_CHECKING:
    from peft import PeftModel
    from torch.distributed import ProcessGroup
    from transformers import PretrainedConfig, PreTrainedTokenizerBase, Trainer

    from lorayard.train.config import TrainConfig
    from lorayard.train.data import Example

IGNORE_INDEX = -100
"""Label of a token outside the loss (the prompt); what transformers' loss ignores."""
TRAINER_STATE_FILE = "trainer_state.json"
"""Trainer writes it last in a checkpoint, so its presence marks a complete checkpoint."""


# -- data -> batches ----------------------------------------------------------------------------------
class CompletionDataset(torch.utils.data.Dataset):
    """Rendered examples as ``input_ids`` and ``labels`` (IGNORE_INDEX wherever the mask is 0)."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        rendered = example.rendered
        labels = [t if m else IGNORE_INDEX for t, m in zip(rendered.ids, rendered.labels_mask, strict=True)]
        item: dict[str, Any] = {"input_ids": rendered.ids, "labels": labels}
        if example.images is not None:
            item["pixel_values"] = example.images.pixel_values
            item["image_grid_thw"] = example.images.grid_thw
        return item


def image_inputs(features: list[dict[str, Any]], input_ids: torch.Tensor, image_token_id: int | None) -> dict:
    """A batch's images for a vision-language base: every example's patches one after another, their
    grids, and which tokens are image tokens (without ``mm_token_type_ids`` transformers cannot build
    the M-RoPE positions and falls back to 1-D ones); {} for a batch without images."""
    with_images = [f for f in features if "pixel_values" in f]
    if not with_images or image_token_id is None:
        return {}
    return {
        "pixel_values": torch.cat([f["pixel_values"] for f in with_images]),
        "image_grid_thw": torch.tensor(
            [g for f in with_images for g in f["image_grid_thw"]], dtype=torch.long
        ),
        "mm_token_type_ids": (input_ids == image_token_id).int(),
    }


@dataclass(frozen=True)
class PaddingCollator:
    """Right-pads a batch to its longest example: input_ids/labels/attention_mask [batch, longest];
    with ``image_token_id`` (a vision-language base) the batch's images too (:func:`image_inputs`)."""

    pad_token_id: int
    image_token_id: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            attention[row, :n] = 1
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": attention,
            **image_inputs(features, ids, self.image_token_id),
        }


def collator(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict]], dict]:
    """Padded batches, or with ``packing`` transformers' padding-free flattening: one row per batch
    whose ``position_ids`` restart at each example. With no attention mask and no KV cache (training
    turns it off) transformers derives a block-diagonal causal mask from those positions, so the loss
    equals the padded batch's (a test proves it)."""
    if config.packing:
        from transformers import DataCollatorWithFlattening

        # separator -100: each example's first label is outside the loss, as it is when padded
        # (no token predicts it).
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return PaddingCollator(pad_token_id(tokenizer), image_token_id(tokenizer))


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The image-pad token's id: a vision-language base's tokenizer has one, a text base's none."""
    return tokenizer.get_vocab().get(IMAGE_PAD)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id, falling back to eos: padded positions are masked, so the value never matters."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


# -- SIGTERM: a preempted pod saves and stops --------------------------------------------------------
class TerminationFlag:
    """Set by SIGTERM; the training loop checks it after every step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    @contextmanager
    def installed(self) -> Iterator[TerminationFlag]:
        """Catch SIGTERM (Kubernetes' preemption signal) instead of dying mid-step; restore after."""

        def handler(signum: int, frame: FrameType | None) -> None:
            print("\nSIGTERM: saving a checkpoint at the end of this step, then exiting", flush=True)
            self.set()

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


class SaveAndStopOnSignal(TrainerCallback):
    """After the step in flight: save a checkpoint (for --resume) and stop, when SIGTERM arrived."""

    def __init__(self, flag: TerminationFlag) -> None:
        self.flag = flag

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self.flag.is_set:
            control.should_save = True
            control.should_training_stop = True
        return control


class PerplexityLogger(TrainerCallback):
    """Adds ``eval_perplexity = exp(eval_loss)`` to every evaluation log (and the loss history)."""

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
            if state.log_history and state.log_history[-1].get("eval_loss") == logs["eval_loss"]:
                state.log_history[-1]["eval_perplexity"] = logs["eval_perplexity"]


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run does not produce inf in JSON."""
    return math.exp(min(loss, 50.0))


# -- model ----------------------------------------------------------------------------------------------
def lora_config(config: TrainConfig, base_config: PretrainedConfig) -> Any:
    """PEFT's LoraConfig for ``config``; ``all-linear`` means the decoder blocks' linears of the base's
    architecture (PEFT's own would also take linears outside the blocks, such as OPT-350m's
    project_in/project_out, which no served adapter may hold)."""
    from peft import LoraConfig, TaskType

    from lorayard.architectures import architecture_for

    arch = architecture_for(base_config)
    names = list(arch.lora_targets) if config.target_modules == "all-linear" else config.target_modules
    # A vision-language base: its language model's linears only (the vision tower stays frozen).
    targets = arch.peft_target_modules(names) if arch.vision else names
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.rank,
        # PEFT annotates an int but only ever computes alpha / r (or / sqrt(r)): a float alpha is exact
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        layers_to_transform=config.layers_to_transform,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        bias="none",
    )


def build_model(config: TrainConfig, base: ResolvedBaseModel, device: str) -> PeftModel:
    """The base (quantized for QLoRA) wrapped in a fresh LoRA adapter, seeded."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from lorayard.server.engine.parity_probe import check_runner_parity

    set_seed(config.seed)
    model = load_base_model(
        base,
        device=device,
        dtype=default_dtype(device),
        quantization=config.quantization,
        fsdp_ranks=fsdp_ranks(config),
    )
    # The server's startup probe, on the same weights, before training is spent on a base it would
    # refuse (UnsupportedArchitecture). A sharded base answers only with every rank taking part: rank 0
    # probes its whole copy after training instead (unsharded_adapter), before anything is published.
    if fsdp_ranks(config) == 1:
        check_runner_parity(model)
    if config.quantization:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return get_peft_model(model, lora_config(config, model.config))


def training_device(config: TrainConfig) -> str:
    """Under torchrun on GPUs each process takes the GPU of its LOCAL_RANK."""
    device = config.device or default_device()
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def fsdp_ranks(config: TrainConfig) -> int:
    """How many processes share the sharded base: the run's world size under ``fsdp``, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) if config.fsdp else 1


def is_main_process() -> bool:
    """True in a single-process run and on rank 0 of torchrun / accelerate launch."""
    return os.environ.get("RANK", "0") == "0"


# -- the run folder ----------------------------------------------------------------------------------------
def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint, complete or not, by step."""
    found = []
    if run_dir.is_dir():
        for child in run_dir.glob("checkpoint-*"):
            step = child.name.removeprefix("checkpoint-")
            if step.isdigit() and child.is_dir():
                found.append((int(step), child))
    return sorted(found)


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    complete = [path for _, path in checkpoints(run_dir) if (path / TRAINER_STATE_FILE).is_file()]
    return complete[-1] if complete else None


def clear_stale_checkpoints(run_dir: Path, keep_upto: Path | None) -> None:
    """A fresh run (``keep_upto`` None) clears old checkpoints; a resumed one drops those newer than
    the one it resumes from (a kill can leave one half-written)."""
    limit = int(keep_upto.name.removeprefix("checkpoint-")) if keep_upto else -1
    for step, path in checkpoints(run_dir):
        if step > limit:
            shutil.rmtree(path, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


# -- several processes: one adapter, one publisher ---------------------------------------------------------
RANK0_TIMEOUT = timedelta(hours=6)
"""How long the other ranks wait for rank 0 to evaluate (the training Job's deadline)."""


def trained_adapter_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """Every trainable (LoRA) tensor whole, on the CPU, by parameter name; and how many of the base's
    weights are sharded.

    With the base sharded at load time the adapter is added after, so its tensors are replicated, and
    Trainer keeps them equal on every rank (broadcast from rank 0, gradients averaged). A sharded one
    (a DTensor) would be all-gathered by ``full_tensor()``, a collective: every rank calls this.
    """
    from torch.distributed.tensor import DTensor

    state, sharded = {}, 0
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            sharded += 1
        if param.requires_grad:
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            state[name] = whole.detach().to("cpu", copy=True)
    return state, sharded


def unsharded_adapter(
    config: TrainConfig, base: ResolvedBaseModel, device: str, state: dict[str, torch.Tensor]
) -> PeftModel:
    """Rank 0's own whole copy of the trained model: the base loaded again, a fresh LoRA adapter of the
    same config, the gathered weights. What it evaluates and saves, through the single-process path,
    so the published files are the same as a single-process run's."""
    from peft import get_peft_model

    from lorayard.server.engine.parity_probe import check_runner_parity

    model = load_base_model(
        base, device=device, dtype=default_dtype(device), quantization=config.quantization
    )
    check_runner_parity(model)  # the probe build_model could not run on the sharded base
    model.config.use_cache = False
    adapted = get_peft_model(model, lora_config(config, model.config))
    adapted_names = {n for n, p in adapted.named_parameters() if p.requires_grad}
    if adapted_names != set(state):
        raise RuntimeError(
            f"the gathered adapter does not match a fresh one: {sorted(adapted_names ^ set(state))[:4]}"
        )
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if name in state:
                param.copy_(state[name])
    return adapted


def ranks_group() -> ProcessGroup | None:
    """A gloo group of every rank, made by all of them together once training is done (None in a
    single process). Its own group, on GPUs too, for its timeout: long enough for rank 0's evaluation
    while the others wait (the default group's is 30 minutes)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.new_group(backend="gloo", timeout=RANK0_TIMEOUT)


def check_replicas_agree(state: dict[str, torch.Tensor], group: ProcessGroup | None) -> None:
    """Every rank holds the same adapter (a collective over ``group``), or RuntimeError.

    Trainer broadcasts the adapter's initial weights and averages its gradients, so the copies stay
    equal; if they did not, rank 0's copy would not be the run's result, and publishing it would be a
    silent wrong answer. A checksum (sum and sum of magnitudes) is compared across ranks."""
    import torch.distributed as dist

    if group is None:
        return
    tensors = list(state.values())
    checksum = torch.tensor(
        [sum(float(t.double().sum()) for t in tensors), sum(float(t.double().abs().sum()) for t in tensors)],
        dtype=torch.float64,
    )
    high, low = checksum.clone(), checksum.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    if not torch.allclose(high, low, rtol=1e-6, atol=0.0):
        raise RuntimeError(
            f"the ranks' copies of the adapter differ (checksums {low.tolist()} .. {high.tolist()})"
        )


def meeting(group: ProcessGroup | None) -> Callable[[], None]:
    """The final meeting of every rank: rank 0 calls it after evaluating and before publishing, the
    other ranks at once, then exit. So rank 0 publishes only when every rank finished training and is
    still alive, and a rank 0 that fails before publishing fails the others' wait too."""
    import torch.distributed as dist

    if group is None:
        return lambda: None
    return lambda: dist.barrier(group=group)


# -- training ------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: PeftModel
    global_step: int
    train_loss: float | None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int | None = None
    best_checkpoint: str | None = None
    train_runtime_s: float | None = None
    interrupted: bool = False
    last_checkpoint: Path | None = None
    meet_other_ranks: Callable[[], None] = lambda: None
    """The final meeting of every rank (:func:`meeting`)."""


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing flags, under the name this transformers version uses."""
    if not enabled:
        return {}
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        else "gradient_checkpointing"
    )
    # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def training_arguments(config: TrainConfig, device: str) -> TrainingArguments:
    on_gpu = device.startswith("cuda")
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(config.run_dir),
        max_steps=config.max_steps or -1,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a value below 1 is a ratio of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        **_checkpointing_arguments(config.gradient_checkpointing and not config.quantization),
        # Never mixed precision on the CPU: bf16 autocast there is ~25x slower than float32.
        bf16=bf16,
        fp16=on_gpu and not bf16,
        use_cpu=not on_gpu,
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.checkpoint_steps,
        save_total_limit=config.save_total_limit,
        # Trainer cannot checkpoint the optimizer of a model sharded at load time: fsdp runs keep the
        # adapter only (the best one is still chosen; --resume is refused for them).
        save_only_model=config.fsdp,
        load_best_model_at_end=config.load_best_model_at_end,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        report_to=list(config.report_to) or "none",
        disable_tqdm=False,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def make_trainer(
    config: TrainConfig,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Example],
    validation: list[Example],
    flag: TerminationFlag,
    device: str,
) -> Trainer:
    from transformers import EarlyStoppingCallback, Trainer

    callbacks: list[TrainerCallback] = [PerplexityLogger(), SaveAndStopOnSignal(flag)]
    if config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    return Trainer(
        model=model,
        args=training_arguments(config, device),
        train_dataset=CompletionDataset(train),
        eval_dataset=CompletionDataset(validation),
        data_collator=collator(config, tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def run_training(
    config: TrainConfig,
    base: ResolvedBaseModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Example],
    validation: list[Example],
    *,
    resume: bool,
    flag: TerminationFlag,
) -> TrainResult:
    """Train (or continue) the adapter; on SIGTERM stop after a checkpoint with ``interrupted=True``."""
    device = training_device(config)
    # Every rank reads the same folder (a shared filesystem under torchrun); only rank 0 cleans it.
    resume_from = last_complete_checkpoint(config.run_dir) if resume else None
    if is_main_process():
        clear_stale_checkpoints(config.run_dir, resume_from)
        if resume and resume_from is None:
            print(f"--resume: no complete checkpoint in {config.run_dir}; starting fresh", flush=True)
    model = build_model(config, base, device)
    trainer = make_trainer(config, model, tokenizer, train, validation, flag, device)
    resumed_from_step = int(resume_from.name.removeprefix("checkpoint-")) if resume_from else None
    if resume_from is not None and is_main_process():
        print(f"resuming from {resume_from} (step {resumed_from_step})", flush=True)
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    state = trainer.state
    trained: PeftModel = trainer.model  # type: ignore[assignment]  # Trainer types it loosely: build_model's
    group = ranks_group()
    if config.fsdp and not flag.is_set:
        # Sharded, the model answers only with every rank taking part: rank 0 evaluates and publishes a
        # whole copy, alone.
        adapter, sharded = trained_adapter_state(trained)
        if not sharded:  # never publish a run that silently trained unsharded copies
            raise RuntimeError("fsdp is set but the base was not sharded (no DTensor weights)")
        check_replicas_agree(adapter, group)
        if is_main_process():
            print(
                f"fsdp: the base was sharded ({sharded} weights), every rank holds the same adapter; "
                "rank 0 publishes alone",
                flush=True,
            )
            del trainer, model, trained
            free_memory(device)
            trained = unsharded_adapter(config, base, device, adapter)
    return TrainResult(
        model=trained,
        global_step=state.global_step,
        train_loss=output.training_loss if not math.isnan(output.training_loss) else None,
        log_history=list(state.log_history),
        resumed_from_step=resumed_from_step,
        best_checkpoint=state.best_model_checkpoint,
        train_runtime_s=output.metrics.get("train_runtime"),
        interrupted=flag.is_set,
        last_checkpoint=last_complete_checkpoint(config.run_dir),
        meet_other_ranks=meeting(group),
    )


def free_memory(device: str) -> None:
    """Return what the deleted sharded model held, before the whole copy is loaded beside it."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
