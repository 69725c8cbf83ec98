"""training: train_job's training throughput vs a plain Trainer + PEFT script, and LoRA vs QLoRA memory.

Variants, each in its own subprocess (so peak RSS is its own), interleaved and repeated:

* ``train_job``: train_job's own path (config, data preparation, ``build_model``, ``make_trainer``);
* ``plain``: the script a user would write: ``AutoModelForCausalLM`` + ``get_peft_model`` + ``Trainer``
  with ``DataCollatorForSeq2Seq``, same examples (rendered ids and labels), same LoRA and batch config;
* ``train_job_qlora``: train_job with 4-bit NF4 base (QLoRA), for the peak-RSS comparison;
* ``train_job_packed``: train_job with ``packing`` (padding-free batches, the same examples per step).

Tokens/s counts non-padding tokens fed to the model in the timed steps, which follow ``WARMUP_STEPS``
untimed ones (first steps load kernels and allocate, which can dominate a 10-step run on a GPU); useful
tokens/s counts only the completion tokens in the loss (the prompt is masked: completion-only loss).
No evaluation or checkpoint happens inside the timed steps. Config: the persona demo
(``lorayard/train/configs/persona.yaml``).

    python -m bench.training [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from bench.record import (
    REPO,
    SuiteResult,
    common_arguments,
    markdown_table,
    measuring,
    median,
    paired_ratios,
    save_figure,
    setup_torch,
    suite_main,
)
from lorayard.base_model import default_base_model

VARIANTS = ("train_job", "plain", "train_job_qlora", "train_job_packed")
WARMUP_STEPS = 2
CONFIG = REPO / "lorayard" / "train" / "configs" / "persona.yaml"


@dataclass
class TokenCountingCollator:
    """Wraps a collator and counts the tokens of every batch it builds, in order: ``tokens`` the model
    reads (padding excluded; a packed batch has none), ``useful`` those in the loss (the completions)."""

    inner: Any
    tokens: list[int] = field(default_factory=list)
    useful: list[int] = field(default_factory=list)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        self.useful.append(int((batch["labels"] != -100).sum()))
        return batch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Stopwatch(TrainerCallback):
    """Wall time of the steps after the first ``warmup``, the device synchronised at both ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.warmup:
            _sync()
            self.start = time.perf_counter()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _sync()
        self.end = time.perf_counter()


def _config(args: argparse.Namespace, scratch: Path, variant: str) -> Any:
    from lorayard.train.config import load_config

    never = args.steps + 1000  # no evaluation or checkpoint inside the timed steps
    overrides = {
        "adapters_dir": scratch / "adapters",
        "output_dir": scratch / "run",
        "base_model": args.base,
        "device": args.device,
        "max_steps": args.steps + WARMUP_STEPS,
        "batch_size": args.batch_size,
        "eval_steps": never,
        "save_steps": never,
        "logging_steps": never,
        "load_best_model_at_end": False,
        "quantization": "4bit" if variant == "train_job_qlora" else None,
        "packing": variant == "train_job_packed",
    }
    return load_config(CONFIG, overrides)


def _prepare(config: Any) -> tuple[Any, Any, Any]:
    from lorayard.base_model import load_tokenizer, resolve_base_model
    from lorayard.train.data import prepare_config_data

    base = resolve_base_model(config.base_model)
    tokenizer = load_tokenizer(base)
    data = prepare_config_data(config, tokenizer)
    return base, tokenizer, data


def _train_job_trainer(config: Any, base: Any, tokenizer: Any, data: Any) -> Any:
    from lorayard.train.train import TerminationFlag, build_model, make_trainer

    model = build_model(config, base, _device(config))
    return make_trainer(
        config, model, tokenizer, data.train, data.validation, TerminationFlag(), _device(config)
    )


def _device(config: Any) -> str:
    return config.device or "cpu"


def _plain_trainer(config: Any, base: Any, tokenizer: Any, data: Any) -> Any:
    """What a user writes from the transformers + PEFT docs, on the same examples and LoRA config."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from lorayard.base_model import default_dtype

    set_seed(config.seed)
    device = _device(config)
    # What the docs say for a GPU (bf16 weights and bf16 mixed precision), float32 on the CPU: the same
    # precision rule the training job follows.
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=default_dtype(device)).to(device)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
    )
    model = get_peft_model(model, lora)
    train = [
        {
            "input_ids": e.rendered.ids,
            "labels": [t if m else -100 for t, m in zip(e.rendered.ids, e.rendered.labels_mask, strict=True)],
        }
        for e in data.train
    ]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    arguments = TrainingArguments(
        output_dir=str(config.run_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        warmup_steps=config.warmup_ratio,
        save_strategy="no",
        report_to="none",
        logging_steps=config.max_steps + 1000,
        use_cpu=not device.startswith("cuda"),
        bf16=bf16,
        fp16=device.startswith("cuda") and not bf16,
        seed=config.seed,
        remove_unused_columns=False,
    )
    return Trainer(
        model=model,
        args=arguments,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One variant's training run, in this process; returns tokens, runtime and memory.

    ``model_bytes`` is the model's own footprint (base weights, quantized or not, plus LoRA), what
    QLoRA shrinks; peak RSS also holds the runtime, the data and, on the CPU, the float32 weights
    bitsandbytes quantizes from; ``peak_gpu_bytes`` is the CUDA allocator's peak on a GPU."""
    with tempfile.TemporaryDirectory(prefix="lorayard-bench-train-") as scratch:
        config = _config(args, Path(scratch), args.worker)
        base, tokenizer, data = _prepare(config)
        if args.worker == "plain":
            trainer = _plain_trainer(config, base, tokenizer, data)
        else:
            trainer = _train_job_trainer(config, base, tokenizer, data)
        counter = TokenCountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        stopwatch = Stopwatch(WARMUP_STEPS)
        trainer.add_callback(stopwatch)
        model_bytes = trainer.model.get_memory_footprint()
        trainer.train()
    assert stopwatch.start is not None and stopwatch.end is not None, "training stopped before warm-up ended"
    runtime = stopwatch.end - stopwatch.start
    # Batch i feeds step i + 1 (one per step: no gradient accumulation); the loader may have built one
    # more batch ahead, which no step used.
    timed = slice(WARMUP_STEPS, trainer.state.global_step)
    tokens, useful = sum(counter.tokens[timed]), sum(counter.useful[timed])
    return {
        "variant": args.worker,
        "steps": trainer.state.global_step - WARMUP_STEPS,
        "tokens": tokens,
        "runtime_s": runtime,
        "tokens_per_s": tokens / runtime,
        "useful_tokens_per_s": useful / runtime,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model_bytes": model_bytes,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }


def _spawn(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    steps = args.qlora_steps if variant == "train_job_qlora" else args.steps
    command = [sys.executable, "-m", "bench.training", "--worker", variant, "--device", args.device]
    command += ["--threads", str(args.threads), "--steps", str(steps), "--batch-size", str(args.batch_size)]
    if args.base:
        command += ["--base", args.base]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, tiny: Path | None = None) -> SuiteResult:
    """Spawn the variants interleaved, then fill the headline ratios."""
    if tiny is not None:
        args.base = str(tiny)
    config = {
        "config": str(CONFIG.relative_to(REPO)),
        "steps": args.steps,
        "qlora_steps": args.qlora_steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "base": args.base or default_base_model(),
    }
    with measuring("training", args, config) as result:
        for repeat in range(args.repeats):
            for variant in VARIANTS[repeat % len(VARIANTS) :] + VARIANTS[: repeat % len(VARIANTS)]:
                row = {"repeat": repeat, **_spawn(args, variant)}
                result.rows.append(row)
                print(
                    f"repeat {repeat} {variant:>16}: {row['tokens_per_s']:7.1f} tok/s, "
                    f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB",
                    flush=True,
                )
    result.add_headline(
        "train_job / plain Trainer+PEFT training tok/s",
        median(paired_ratios(result.rows, "train_job", "plain", key="tokens_per_s")),
        "x",
    )
    result.add_headline(
        "packed / padded train_job useful (completion) tok/s",
        median(paired_ratios(result.rows, "train_job_packed", "train_job", key="useful_tokens_per_s")),
        "x",
    )
    if all("model_bytes" in r for r in result.rows):
        result.add_headline(
            "QLoRA (4-bit) / LoRA model memory footprint",
            median(paired_ratios(result.rows, "train_job_qlora", "train_job", key="model_bytes")),
            "x",
        )
    if all(r.get("peak_gpu_bytes") for r in result.rows):
        result.add_headline(
            "QLoRA (4-bit) / LoRA peak GPU memory",
            median(paired_ratios(result.rows, "train_job_qlora", "train_job", key="peak_gpu_bytes")),
            "x",
        )
    result.add_headline(
        "QLoRA (4-bit) / LoRA peak RSS",
        median(paired_ratios(result.rows, "train_job_qlora", "train_job", key="peak_rss_bytes")),
        "x",
    )
    result.add_headline(
        "QLoRA (4-bit) / LoRA training tok/s",
        median(paired_ratios(result.rows, "train_job_qlora", "train_job", key="tokens_per_s")),
        "x",
    )
    return result


def details(result: SuiteResult) -> str:
    rows = []
    for variant in VARIANTS:
        picked = [r for r in result.rows if r["variant"] == variant]
        rows.append(
            [
                variant,
                median([r["tokens_per_s"] for r in picked]),
                median([r["useful_tokens_per_s"] for r in picked]),
                median([r["peak_rss_bytes"] / 2**20 for r in picked]),
                picked[0]["steps"] if picked else 0,
            ]
        )
    return (
        "Medians per variant:\n\n"
        + markdown_table(["variant", "tok/s", "useful tok/s", "peak RSS MiB", "steps"], rows)
        + "\n\n![training](training.png)"
    )


def _plot(result: SuiteResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
    tps = [median([r["tokens_per_s"] for r in result.rows if r["variant"] == v]) for v in VARIANTS]
    rss = [median([r["peak_rss_bytes"] / 2**20 for r in result.rows if r["variant"] == v]) for v in VARIANTS]
    left.bar(VARIANTS, tps, color="tab:blue")
    left.set_ylabel("training tokens/s (median)")
    right.bar(VARIANTS, rss, color="tab:orange")
    right.set_ylabel("peak RSS MiB (median)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=15)
    save_figure(fig, folder / "training.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the --quick defaults filled in."""
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--qlora-steps", type=int, default=None, help="QLoRA is slow on CPU: fewer steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--base", default=None, help="base model (default: the embedded one)")
    parser.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 10)
    args.qlora_steps = args.qlora_steps or max(2, args.steps // 2)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        setup_torch(args)
        print(json.dumps(worker(args)))
        return
    suite_main(lambda: args, run, details, _plot)


if __name__ == "__main__":
    main()
