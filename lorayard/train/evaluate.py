"""The evaluation report: base vs adapter on the validation split, held-back prompts, loss curve.

The base is the same PEFT model with its adapter disabled, so both sides share weights, prompts and
code. Answers are greedy and stop at the chat format's end-of-turn ids, as the server does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, Field

from lorayard.chat_format import stop_token_ids
from lorayard.train.train import (
    IGNORE_INDEX,
    CompletionDataset,
    PaddingCollator,
    image_token_id,
    pad_token_id,
    perplexity,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lorayard.train.data import Example, ExampleImages

EVAL_FILE = "eval.json"
LOSS_CURVE_FILE = "loss_curve.png"


class SideMetrics(BaseModel):
    loss: float = Field(description="mean cross-entropy over the validation completion tokens")
    perplexity: float
    chrf: float | None = Field(None, description="mean chrF of the held-back answers vs the references")


class SampleAnswer(BaseModel):
    source: str = Field(description="file:line of the validation record")
    prompt: str
    reference: str
    base: str
    adapter: str
    chrf_base: float
    chrf_adapter: float


class EvalReport(BaseModel):
    """``eval.json`` beside the adapter."""

    base: SideMetrics
    adapter: SideMetrics
    validation_examples: int
    validation_tokens: int
    trainable_parameters: int
    total_parameters: int
    trainable_percent: float
    samples: list[SampleAnswer] = Field(default_factory=list)
    loss_history: list[dict[str, float]] = Field(
        default_factory=list, description="(step, loss) and (step, eval_loss) as Trainer logged them"
    )

    def manifest_metrics(self) -> dict[str, Any]:
        """The flat numbers a manifest records (``eval_loss`` is what --publish-if-better compares)."""
        return {
            "eval_loss": self.adapter.loss,
            "eval_perplexity": self.adapter.perplexity,
            "base_eval_loss": self.base.loss,
            "base_eval_perplexity": self.base.perplexity,
            "chrf": self.adapter.chrf,
            "base_chrf": self.base.chrf,
            "trainable_parameters": self.trainable_parameters,
            "trainable_percent": self.trainable_percent,
        }


@torch.no_grad()
def completion_loss(
    model: PreTrainedModel | PeftModel,
    examples: list[Example],
    *,
    pad_id: int,
    batch_size: int,
    image_token: int | None = None,
) -> tuple[float, int]:
    """(mean loss per trained token, number of trained tokens) over ``examples`` (``image_token``: a
    vision-language base's image-pad id, for examples with images)."""
    device = next(model.parameters()).device
    collate = PaddingCollator(pad_id, image_token)
    dataset = CompletionDataset(examples)
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()  # [batch, seq, vocab]
        labels = batch["labels"].to(device)[:, 1:]  # token t+1 is predicted at position t
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1), count


@torch.no_grad()
def generate_from_ids(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    images: ExampleImages | None = None,
) -> str:
    """Greedy answer to a prompt already rendered (the ids the server would send), with its images."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    extra: dict[str, torch.Tensor] = {}
    if images is not None:
        pad = image_token_id(tokenizer)
        assert pad is not None  # a base that read the example's images has the token
        extra = {
            "pixel_values": images.pixel_values.to(device),
            "image_grid_thw": torch.tensor(images.grid_thw, device=device),
            "mm_token_type_ids": torch.eq(ids, pad).int(),
        }
    # PeftModel forwards generate to its base through __getattr__, which torch types as Tensor | Module
    output = model.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(stop_token_ids(tokenizer)),
        pad_token_id=pad_token_id(tokenizer),
        **extra,
    )
    return str(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)).strip()


def _chrf(hypothesis: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(hypothesis, [reference]).score)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    validation: list[Example],
    *,
    prompts: int,
    max_new_tokens: int,
    batch_size: int,
    log_history: list[dict[str, Any]],
) -> EvalReport:
    """Validation loss/perplexity and held-back answers for the base (adapter disabled) and the adapter."""
    model.eval()
    pad_id = pad_token_id(tokenizer)
    image_token = image_token_id(tokenizer)
    held_back = validation[:prompts]

    def losses() -> tuple[float, int]:
        return completion_loss(
            model, validation, pad_id=pad_id, batch_size=batch_size, image_token=image_token
        )

    def answers() -> list[str]:
        return [
            generate_from_ids(model, tokenizer, e.prompt_ids, max_new_tokens=max_new_tokens, images=e.images)
            for e in held_back
        ]

    adapter_loss, tokens = losses()
    adapter_answers = answers()
    with model.disable_adapter():
        base_loss, _ = losses()
        base_answers = answers()
    samples = [
        SampleAnswer(
            source=e.source,
            prompt=e.prompt_messages[-1]["content"],
            reference=e.reference,
            base=base,
            adapter=adapted,
            chrf_base=_chrf(base, e.reference),
            chrf_adapter=_chrf(adapted, e.reference),
        )
        for e, base, adapted in zip(held_back, base_answers, adapter_answers, strict=True)
    ]
    trainable, total = model.get_nb_trainable_parameters()
    return EvalReport(
        base=SideMetrics(
            loss=base_loss, perplexity=perplexity(base_loss), chrf=_mean([s.chrf_base for s in samples])
        ),
        adapter=SideMetrics(
            loss=adapter_loss,
            perplexity=perplexity(adapter_loss),
            chrf=_mean([s.chrf_adapter for s in samples]),
        ),
        validation_examples=len(validation),
        validation_tokens=tokens,
        trainable_parameters=trainable,
        total_parameters=total,
        trainable_percent=100.0 * trainable / total,
        samples=samples,
        loss_history=[
            {k: float(v) for k, v in entry.items() if k in ("step", "loss", "eval_loss")}
            for entry in log_history
            if "loss" in entry or "eval_loss" in entry
        ],
    )


def plot_loss_curve(report: EvalReport, path: Path) -> None:
    """Train and eval loss against the step, plus the base's validation loss as a reference line."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod or a test
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for key, label, marker in (("loss", "train loss", "."), ("eval_loss", "eval loss", "o")):
        points = [(e["step"], e[key]) for e in report.loss_history if key in e]
        if points:
            axes.plot(*zip(*points, strict=True), marker=marker, label=label)
    axes.axhline(report.base.loss, color="grey", linestyle="--", label="base eval loss")
    axes.axhline(report.adapter.loss, color="green", linestyle=":", label="adapter eval loss (published)")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (completion tokens)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report: EvalReport, folder: Path) -> None:
    """eval.json and loss_curve.png into ``folder``."""
    (folder / EVAL_FILE).write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    plot_loss_curve(report, folder / LOSS_CURVE_FILE)


def print_report(report: EvalReport) -> None:
    """A short base-vs-adapter comparison on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="base vs adapter (validation split)")
    table.add_column("")
    table.add_column("base", justify="right")
    table.add_column("adapter", justify="right")
    table.add_row("loss", f"{report.base.loss:.4f}", f"{report.adapter.loss:.4f}")
    table.add_row("perplexity", f"{report.base.perplexity:.2f}", f"{report.adapter.perplexity:.2f}")
    if report.base.chrf is not None and report.adapter.chrf is not None:
        table.add_row("chrF (held-back)", f"{report.base.chrf:.1f}", f"{report.adapter.chrf:.1f}")
    console.print(table)
    console.print(
        f"trainable parameters: {report.trainable_parameters:,} of {report.total_parameters:,} "
        f"({report.trainable_percent:.3f}%)"
    )
    if report.samples:
        answers = Table(title="held-back prompts (greedy)", show_lines=True)
        for column in ("prompt", "reference", "base", "adapter"):
            answers.add_column(column, overflow="fold")
        for sample in report.samples:
            answers.add_row(sample.prompt, sample.reference, sample.base, sample.adapter)
        console.print(answers)
