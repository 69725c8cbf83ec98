"""``lorayard train | generate | merge | promote | rollback | history`` (``python -m lorayard.train``).

Exit codes (one meaning each, so a pipeline can branch on them):
0 published (or dry run / printed config, promoted, rolled back); 1 unexpected failure; 2 bad config
or flags; 3 bad data (every problem listed); 4 --publish-if-better refused; 5 the serving check failed
(the server would refuse the base or the adapter; checked before training and again before publishing);
6 promote/rollback refused (no such version, nothing to roll back; nothing changed);
143 SIGTERM (a checkpoint was saved; run again with --resume).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lorayard.base_model import ResolvedBaseModel
    from lorayard.train.config import TrainConfig
    from lorayard.train.data import Example, PreparedData
    from lorayard.train.train import TerminationFlag
    from lorayard.volume import AdapterVolume

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_NOT_BETTER = 4
EXIT_SERVING_CHECK = 5
EXIT_LIFECYCLE = 6
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM
DRY_RUN_EXAMPLES = 3


def _train_parser() -> argparse.ArgumentParser:
    from lorayard.train.config import DEFAULT_CONFIG, add_config_flags

    parser = argparse.ArgumentParser(
        prog="lorayard train",
        description="Train a LoRA adapter and publish it to the adapters volume. "
        "Subcommands: train (default), generate, merge.",
    )
    parser.add_argument(
        "--config", type=Path, help=f"YAML config (default: the persona demo, {DEFAULT_CONFIG.name})"
    )
    add_config_flags(parser.add_argument_group("config overrides (a flag wins over the config file)"))
    actions = parser.add_argument_group("actions")
    actions.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    actions.add_argument(
        "--dry-run", action="store_true", help="validate data and config, show rendered examples, exit"
    )
    actions.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


_NOT_CONFIG = ("config", "resume", "dry_run", "print_config")


def _print_config(config: TrainConfig) -> None:
    import yaml

    print(yaml.safe_dump(config.to_jsonable(), sort_keys=False), end="", flush=True)


def _show_example(example: Example, tokenizer: PreTrainedTokenizerBase) -> None:
    """The rendered ids with trained tokens highlighted and bracketed: ⟦trained⟧."""
    from rich.console import Console
    from rich.text import Text

    text = Text()
    rendered = example.rendered
    start = 0
    while start < len(rendered.ids):
        end = start
        while end < len(rendered.ids) and rendered.labels_mask[end] == rendered.labels_mask[start]:
            end += 1
        piece = str(tokenizer.decode(rendered.ids[start:end]))
        if rendered.labels_mask[start]:
            text.append(f"⟦{piece}⟧", style="bold green")
        else:
            text.append(piece, style="dim")
        start = end
    console = Console()
    trained = sum(rendered.labels_mask)
    console.rule(f"{example.source}: {len(rendered)} tokens, {trained} trained (⟦bracketed⟧)")
    console.print(text)


def run_train(argv: list[str]) -> int:
    """The train command; returns the exit code."""
    from lorayard.train.config import ConfigError, load_config
    from lorayard.train.data import DataError, prepare_config_data

    args = _train_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and v is not None}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        _print_config(config)
        return EXIT_OK
    refused = _refuse_fsdp_misuse(config, resume=args.resume)
    if refused is not None:
        return refused

    from lorayard.base_model import BaseModelError, load_tokenizer, resolve_base_model

    try:
        base = resolve_base_model(config.base_model)
    except BaseModelError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    refused = _refuse_unservable(config, base)
    if refused is not None:
        return refused
    tokenizer = load_tokenizer(base)
    try:
        data = prepare_config_data(config, tokenizer, _image_processor(base))
    except DataError as exc:
        print(f"data error: nothing was trained or published.\n{exc}", file=sys.stderr)
        return EXIT_DATA

    from lorayard.train.train import is_main_process

    if args.dry_run:
        if is_main_process():
            _print_config(config)
            formats = ", ".join(f"{Path(f).name}: {fmt}" for f, fmt in data.formats.items())
            print(
                f"data OK: {len(data.train)} training, {len(data.validation)} validation examples ({formats})"
            )
            for example in data.train[:DRY_RUN_EXAMPLES]:
                _show_example(example, tokenizer)
        return EXIT_OK
    return _train_and_publish(config, base, tokenizer, data, resume=args.resume)


def _image_processor(base: ResolvedBaseModel) -> Any:
    """A vision-language base's image processor (its images are data); None for a text base."""
    from transformers import AutoConfig

    from lorayard.architectures import architecture_for
    from lorayard.vision import load_image_processor

    return (
        load_image_processor(base.path)
        if architecture_for(AutoConfig.from_pretrained(base.path)).vision
        else None
    )


def _refuse_fsdp_misuse(config: TrainConfig, *, resume: bool) -> int | None:
    """fsdp needs a multi-process launch, and its checkpoints (the adapter only) cannot be resumed;
    accelerate's own FSDP (an `accelerate launch` config with FSDP) would shard the model a second way,
    and rank 0 could then not evaluate it alone."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        print(
            "config error: accelerate's FSDP config is not used: launch without it "
            "(`accelerate launch --multi_gpu --num_processes N ...`) and pass --fsdp",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if not config.fsdp:
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        print(
            "config error: fsdp shards the base across processes: launch two or more with "
            "`torchrun --nproc-per-node N -m lorayard.train ...` (or `accelerate launch`)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if resume:
        print(
            "config error: --resume with fsdp: its checkpoints hold the adapter, not the optimizer "
            "state (Trainer cannot save that of a base sharded at load time); run without --resume",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return None


def _refuse_unservable(config: TrainConfig, base: ResolvedBaseModel) -> int | None:
    """Before any data or weights are read: the exit code when the server could not serve the result."""
    from transformers import AutoConfig

    from lorayard.train.publish import ServingCheckError, check_base_servable

    try:
        arch = check_base_servable(AutoConfig.from_pretrained(base.path))
    except ServingCheckError as exc:
        print(f"{exc}; nothing trained or published", file=sys.stderr)
        return EXIT_SERVING_CHECK
    if arch.vision and config.packing:  # packed rows would need their images' M-RoPE positions
        print(
            f"config error: packing is not supported on a vision-language base ({arch.name})", file=sys.stderr
        )
        return EXIT_CONFIG
    if isinstance(config.target_modules, list):
        unknown = [m for m in config.target_modules if m not in arch.lora_targets]
        if unknown:
            print(
                f"config error: target_modules {unknown} are not linears of this {arch.name} base; "
                f"its LoRA targets: {', '.join(arch.lora_targets)} (or all-linear)",
                file=sys.stderr,
            )
            return EXIT_CONFIG
    if config.packing and not arch.packs_exactly:
        print(
            f"config error: packing is not exact on this {arch.name} base (transformers' forward lets packed "
            f"examples attend to each other); train without --packing",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return None


def _train_and_publish(
    config: TrainConfig,
    base: ResolvedBaseModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    *,
    resume: bool,
) -> int:
    from lorayard.train.train import TerminationFlag

    with TerminationFlag().installed() as flag:
        return _train_evaluate_publish(config, base, tokenizer, data, resume=resume, flag=flag)


def _train_evaluate_publish(
    config: TrainConfig,
    base: ResolvedBaseModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    *,
    resume: bool,
    flag: TerminationFlag,
) -> int:
    from lorayard.architectures import UnsupportedArchitecture
    from lorayard.train.evaluate import evaluate_adapter, print_report
    from lorayard.train.publish import NotBetterError, ServingCheckError, build_manifest, publish_adapter
    from lorayard.train.train import is_main_process, run_training
    from lorayard.volume import AdapterVolume

    try:
        result = run_training(config, base, tokenizer, data.train, data.validation, resume=resume, flag=flag)
    except UnsupportedArchitecture as exc:  # the parity probe on the loaded base
        print(f"the server cannot serve this base: {exc}; nothing trained or published", file=sys.stderr)
        return EXIT_SERVING_CHECK
    if result.interrupted:
        again = (
            "Run again to start over (an fsdp run's checkpoints cannot be resumed)."
            if config.fsdp
            else "Run again with --resume to continue."
        )
        print(
            f"terminated at step {result.global_step}: checkpoint {result.last_checkpoint}; "
            f"nothing published. {again}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_TERMINATED
    if not is_main_process():
        result.meet_other_ranks()  # rank 0 evaluates and publishes, once every rank got here
        return EXIT_OK
    report = evaluate_adapter(
        result.model,
        tokenizer,
        data.validation,
        prompts=config.eval_prompts,
        max_new_tokens=config.eval_max_new_tokens,
        batch_size=config.batch_size,
        log_history=result.log_history,
    )
    print_report(report)
    if flag.is_set:
        print("SIGTERM during evaluation: nothing published", file=sys.stderr)
        return EXIT_TERMINATED
    result.meet_other_ranks()  # every rank finished training and is alive: publish
    manifest = build_manifest(
        name=config.name,
        base_id=base.model_id,
        base_sha256=base.fingerprint,
        datasets=data.datasets,
        config=config.to_jsonable(),
        report=report,
        prompt_template=data.prompt_template,
        tool_format=data.tool_format,
        extra_metrics={
            "global_step": result.global_step,
            "train_loss": result.train_loss,
            "resumed_from_step": result.resumed_from_step,
            "train_runtime_s": result.train_runtime_s,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        },
    )
    try:
        published = publish_adapter(
            AdapterVolume(config.volume_dir),
            result.model,
            result.model.get_base_model().config,  # type: ignore[arg-type]  # PEFT types its base as a Module
            manifest,
            report,
            if_better=config.publish_if_better,
        )
    except NotBetterError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_NOT_BETTER
    except ServingCheckError as exc:
        print(f"{exc}; nothing published", file=sys.stderr)
        return EXIT_SERVING_CHECK
    print(f"published {published.key} -> {published.location or published.path}", flush=True)
    # The checkpoints served their purpose (resume); the published version is the result.
    shutil.rmtree(config.run_dir, ignore_errors=True)
    return EXIT_OK


# -- generate and merge -----------------------------------------------------------------------------
def _adapter_folder(value: str, adapters_dir: str | None) -> Path:
    """A folder path as is; otherwise ``name`` / ``name@vN`` on the adapters volume."""
    from lorayard.train.config import adapters_location
    from lorayard.volume import AdapterVolume

    if Path(value).is_dir():
        return Path(value)
    return AdapterVolume(adapters_location(adapters_dir)).resolve(value).path


def _base_for(adapter: Path | None, base_model: str | None) -> ResolvedBaseModel:
    """--base-model, else the base the adapter's manifest names, else the default."""
    from lorayard.base_model import resolve_base_model
    from lorayard.volume import MANIFEST_FILE, read_manifest

    if base_model is None and adapter is not None and (adapter / MANIFEST_FILE).is_file():
        base_model = read_manifest(adapter).base_model.id
    return resolve_base_model(base_model)


def run_generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lorayard generate", description="Answer a prompt with an adapter, no server needed."
    )
    parser.add_argument("--adapter", help="adapter folder, or name / name@vN on --adapters-dir")
    parser.add_argument("--adapters-dir", help="a folder or s3://bucket/prefix")
    parser.add_argument("--prompt", required=True, action="append", help="user message (repeat for several)")
    parser.add_argument("--system", help="system message (default: the chat template's)")
    parser.add_argument("--base-only", action="store_true", help="answer with the base, adapter disabled")
    parser.add_argument("--base-model", help="default: the base named in the adapter's manifest")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    if not args.adapter and not args.base_only:
        parser.error("--adapter is required unless --base-only")

    from lorayard.base_model import load_base_model, load_tokenizer
    from lorayard.chat_format import Message, encode_text, render_prompt
    from lorayard.train.evaluate import generate_from_ids
    from lorayard.volume import MANIFEST_FILE, read_manifest

    adapter = _adapter_folder(args.adapter, args.adapters_dir) if args.adapter else None
    base = _base_for(adapter, args.base_model)
    tokenizer = load_tokenizer(base)
    # As the server renders: the adapter's recorded prompt template, else the base's chat template;
    # with neither (a raw completions adapter) the prompt is raw text, as /v1/completions sends it.
    template = None
    if adapter is not None and (adapter / MANIFEST_FILE).is_file():
        template = read_manifest(adapter).prompt_template
    model: PreTrainedModel | PeftModel = load_base_model(base)
    if adapter is not None and not args.base_only:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    for prompt in args.prompt:
        messages: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        if template is None and tokenizer.chat_template is None:
            ids = encode_text(tokenizer, prompt)
        else:
            ids = render_prompt(tokenizer, messages, template)
        print(generate_from_ids(model, tokenizer, ids, max_new_tokens=args.max_new_tokens), flush=True)
    return EXIT_OK


def run_merge(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lorayard merge", description="Write base + adapter as one full model."
    )
    parser.add_argument("--adapter", required=True, help="adapter folder, or name / name@vN")
    parser.add_argument("--adapters-dir", help="a folder or s3://bucket/prefix")
    parser.add_argument("--out", type=Path, required=True, help="output folder (safetensors + tokenizer)")
    parser.add_argument("--base-model", help="default: the base named in the adapter's manifest")
    args = parser.parse_args(argv)

    import torch
    from peft import PeftModel

    from lorayard.base_model import load_base_model, load_tokenizer

    adapter = _adapter_folder(args.adapter, args.adapters_dir)
    base = _base_for(adapter, args.base_model)
    model = PeftModel.from_pretrained(load_base_model(base, device="cpu", dtype=torch.float32), str(adapter))
    merged = model.merge_and_unload()
    merged.save_pretrained(str(args.out), safe_serialization=True)
    load_tokenizer(base).save_pretrained(str(args.out))
    print(f"merged {adapter} into {base.model_id} -> {args.out}")
    return EXIT_OK


# -- lifecycle: promote, canary, roll back, history ---------------------------------------------------
def _lifecycle_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"lorayard {prog}", description=description)
    parser.add_argument("name", help="adapter name")
    parser.add_argument(
        "--adapters-dir",
        help="a folder or s3://bucket/prefix (default $LORAYARD_ADAPTERS_DIR, else ./adapters)",
    )
    return parser


def _open_volume(adapters_dir: str | None) -> AdapterVolume:
    from lorayard.train.config import adapters_location
    from lorayard.volume import AdapterVolume

    return AdapterVolume(adapters_location(adapters_dir))


def _lifecycle(action: Callable[[], str]) -> int:
    """Run one lifecycle change; its refusal is exit 6 with the reason, nothing changed."""
    from lorayard.volume import VolumeError

    try:
        print(action(), flush=True)
    except VolumeError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_LIFECYCLE
    return EXIT_OK


def run_promote(argv: list[str]) -> int:
    parser = _lifecycle_parser(
        "promote", "Point LATEST at a published version (ends a canary), or --canary P: send P%% to it."
    )
    parser.add_argument("version", help="v<N>")
    parser.add_argument("--reason", help="why, recorded in the history")
    parser.add_argument(
        "--canary", type=float, metavar="PERCENT", help="split: PERCENT to this version, the rest to LATEST"
    )
    args = parser.parse_args(argv)
    from lorayard.volume import parse_version

    def promote() -> str:
        volume = _open_volume(args.adapters_dir)
        version = parse_version(args.version)
        if args.canary is not None:
            routing = volume.canary(args.name, version, args.canary, reason=args.reason)
            split = ", ".join(f"{r.weight:g}% {r.version}" for r in routing.routes)
            return f"{args.name}: canary split {split}"
        entry = volume.promote(args.name, version, reason=args.reason)
        return f"{args.name}: LATEST {entry.from_version} -> {entry.to}"

    return _lifecycle(promote)


def run_rollback(argv: list[str]) -> int:
    parser = _lifecycle_parser(
        "rollback", "Undo the last publish, promote or canary of NAME (repeat to walk further back)."
    )
    parser.add_argument("--reason", help="why, recorded in the history")
    args = parser.parse_args(argv)

    def rollback() -> str:
        entry = _open_volume(args.adapters_dir).rollback(args.name, reason=args.reason)
        return f"{args.name}: LATEST {entry.from_version} -> {entry.to} ({entry.reason})"

    return _lifecycle(rollback)


def run_history(argv: list[str]) -> int:
    args = _lifecycle_parser("history", "Print NAME's history file (JSON lines, oldest first).").parse_args(
        argv
    )
    return _lifecycle(
        lambda: "".join(e.line() for e in _open_volume(args.adapters_dir).history(args.name)).rstrip("\n")
    )


COMMANDS = {
    "train": run_train,
    "generate": run_generate,
    "merge": run_merge,
    "promote": run_promote,
    "rollback": run_rollback,
    "history": run_history,
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch: the first argument picks the command; anything else is `train`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return run_train(argv)


if __name__ == "__main__":
    sys.exit(main())
