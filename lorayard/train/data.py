"""Training data: read files, detect their format, validate every record, render through chat_format.

Every format becomes a conversation (``messages``) and goes through
:func:`lorayard.chat_format.render_conversation`, so the model trains on exactly the prompt ids the
server sends. On a base without a chat template, chat-style data is rendered with the prompt
template (the config's, else :data:`~lorayard.chat_format.DEFAULT_PROMPT_TEMPLATE`), and
text/target and prompt/completion rows train as raw prompt + completion + EOS
(:func:`~lorayard.chat_format.render_completion`), what ``/v1/completions`` sends.

Tool use: ``messages`` records may carry ``tools`` (OpenAI's function specs), assistant turns with
``tool_calls`` (``content`` null or empty) and ``tool`` results; ShareGPT records take ``function_call``
turns (``{"name", "arguments"}`` as JSON text) and ``observation`` results, with ``tools`` as a list or
its JSON text. They render in the base's tool-call format (:mod:`lorayard.tool_format`), so the loss
covers the calls exactly as the server parses them, and the format is recorded in the manifest.

Problems are collected over all files (up to a cap) and raised together as one :class:`DataError`,
each with its ``file:line`` (``file: record N`` where a line is unknown), before any model is loaded.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorayard.chat_format import (
    ROLES,
    ChatFormatError,
    Message,
    RenderedExample,
    Role,
    ToolCallEntry,
    ToolContext,
    ToolSpec,
    chat_template_for,
    render_completion,
    render_conversation,
)
from lorayard.tool_format import ToolFormat, UnknownToolFormat, tool_format_for_template
from lorayard.vision import (
    IMAGE_PAD,
    IMAGE_PLACEHOLDER,
    ImageError,
    ImageLimits,
    decode_image,
    preprocess_images,
)
from lorayard.volume import DatasetRef

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lorayard.train.config import DataFormat, TrainConfig

FORMATS: dict[str, tuple[str, ...]] = {
    # format -> fields that identify it (all must be present)
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text_target": ("text", "target"),
}
IMAGE_MARK = "<image>"
"""Where an image of a ShareGPT record's ``images`` column goes in its text (LLaMA-Factory's mark)."""

COMPLETION_FORMATS = ("prompt_completion", "text_target")
"""Formats that train as raw prompt + completion + EOS on a base without a chat template."""
SHAREGPT_ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
}


@dataclass(frozen=True)
class DataIssue:
    """One bad record: where it is and what is wrong."""

    location: str
    problem: str

    def __str__(self) -> str:
        return f"{self.location}: {self.problem}"


class DataError(ValueError):
    """The data has problems; ``issues`` lists them (capped), each with file and line."""

    def __init__(self, issues: list[DataIssue], *, truncated: bool = False) -> None:
        self.issues = issues
        self.truncated = truncated
        more = "\n  ... (more problems not listed: raise max_data_errors to see them)" if truncated else ""
        super().__init__(f"{len(issues)} data problem(s):\n" + "\n".join(f"  {i}" for i in issues) + more)


@dataclass(frozen=True)
class ExampleImages:
    """An example's images as the base's image processor reads them (``lorayard.vision``)."""

    paths: tuple[Path, ...]
    pixel_values: Any
    """torch.Tensor [patches, dim]: every image's patches, one image after another."""
    grid_thw: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Example:
    """One validated record as a conversation, with where it came from and its rendered ids."""

    source: str
    """``file:line`` of the record."""
    file: Path
    messages: list[Message]
    rendered: RenderedExample
    tools: tuple[ToolSpec, ...] = ()
    """The tools the conversation offers (rendered into its prompts)."""
    images: ExampleImages | None = None
    """A vision-language base's images, in the order of their placeholders in ``rendered``."""

    @property
    def prompt_messages(self) -> list[Message]:
        """Everything before the last assistant turn: what a held-back prompt sends."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def prompt_ids(self) -> list[int]:
        """The ids before the last trained span: what the server is sent for the held-back prompt."""
        mask = self.rendered.labels_mask
        last = max(i for i, m in enumerate(mask) if m)
        while last > 0 and mask[last - 1]:
            last -= 1
        return self.rendered.ids[:last]

    @property
    def reference(self) -> str:
        """The last assistant turn's text (for a turn of calls alone: the calls, as JSON)."""
        last = next(m for m in reversed(self.messages) if m["role"] == "assistant")
        if last["content"] or not last.get("tool_calls"):
            return last["content"]
        return json.dumps([c["function"] for c in last.get("tool_calls", [])])


@dataclass
class PreparedData:
    """Training and validation examples plus what the manifest records about the files."""

    train: list[Example]
    validation: list[Example]
    datasets: list[DatasetRef] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    """file -> detected (or forced) format."""
    prompt_template: str | None = None
    """The prompt template chat-style examples were rendered with when it is not the base tokenizer's
    own chat template; the manifest records it for the server."""
    tool_format: str | None = None
    """The tool-call format tool conversations were rendered in (None: the data has no tools)."""


class _Collector:
    """Collects issues up to a cap; raises once the cap is reached so huge broken files stop early."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.issues: list[DataIssue] = []

    def add(self, location: str, problem: str) -> None:
        if len(self.issues) >= self.cap:
            raise DataError(self.issues, truncated=True)
        self.issues.append(DataIssue(location, problem))


# -- reading files ---------------------------------------------------------------------------------
RawRecord = tuple[str, Any]
"""(location, parsed value) of one record."""


def _read_jsonl(path: Path, issues: _Collector) -> Iterator[RawRecord]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                issues.add(f"{path}:{lineno}", f"broken JSON: {exc.msg} (column {exc.colno})")


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index].isspace():
        index += 1
    return index


def _read_json_array(path: Path, issues: _Collector) -> Iterator[RawRecord]:
    """A JSON list of records, decoded one element at a time so each keeps its line number."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    index = _skip_space(text, 0)
    if text[index : index + 1] != "[":
        issues.add(f"{path}:1", "a .json file must hold a list of records (use .jsonl for one per line)")
        return
    index = _skip_space(text, index + 1)
    record = 0
    while index < len(text) and text[index] != "]":
        line = text.count("\n", 0, index) + 1
        try:
            value, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            issues.add(
                f"{path}:{exc.lineno}", f"broken JSON in record {record}: {exc.msg} (column {exc.colno})"
            )
            return
        yield f"{path}:{line}", value
        record += 1
        index = _skip_space(text, index)
        if text[index : index + 1] == ",":
            index = _skip_space(text, index + 1)
        elif text[index : index + 1] != "]":
            issues.add(f"{path}:{text.count(chr(10), 0, index) + 1}", "broken JSON: expected ',' or ']'")
            return


def _read_csv(path: Path, issues: _Collector) -> Iterator[RawRecord]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}


def read_records(path: Path, issues: _Collector) -> list[RawRecord]:
    """Every record of one file with its location; unreadable records go to ``issues``."""
    if not path.is_file():
        issues.add(str(path), "file not found")
        return []
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(_read_jsonl(path, issues))
    if suffix == ".json":
        return list(_read_json_array(path, issues))
    if suffix == ".csv":
        return list(_read_csv(path, issues))
    issues.add(str(path), f"unsupported file type {suffix!r}: use .jsonl, .json or .csv")
    return []


# -- formats -----------------------------------------------------------------------------------------
def detect_format(records: list[RawRecord]) -> str | None:
    """The format whose identifying fields the first object record has; None when none fits."""
    for _, value in records:
        if isinstance(value, dict):
            for name, keys in FORMATS.items():
                if all(k in value for k in keys):
                    return name
            return None
    return None


class _RecordProblem(ValueError):
    """Internal: one record is unusable; the message says why."""


def _text_field(record: dict[str, Any], key: str, *, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise _RecordProblem(f"missing field {key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise _RecordProblem(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise _RecordProblem(f"field {key!r} is empty")
    return value


def _content_with_images(content: Any, where: str, images: list[str]) -> Any:
    """A ``messages`` turn's content given as parts: text parts joined, each image part
    (``{"type": "image", "image": PATH}`` or ``{"type": "image_url", "image_url": {"url": PATH}}``)
    its placeholder in the text, its path appended to ``images``; any other content unchanged."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image" and isinstance(part.get("image"), str):
            images.append(part["image"])
            texts.append(IMAGE_PLACEHOLDER)
        elif kind == "image_url" and isinstance((part.get("image_url") or {}).get("url"), str):
            images.append(part["image_url"]["url"])
            texts.append(IMAGE_PLACEHOLDER)
        else:
            raise _RecordProblem(
                f"{where}[{j}] must be a text part or an image part ({{'type': 'image', 'image': PATH}})"
            )
    return "".join(texts)


def _chat_list(
    record: dict[str, Any], key: str, role_key: str, text_key: str, images: list[str] | None = None
) -> list[Message]:
    turns = record.get(key)
    if turns is None:
        raise _RecordProblem(f"missing field {key!r}")
    if not isinstance(turns, list):
        raise _RecordProblem(f"field {key!r} must be a list, got {type(turns).__name__}")
    if not turns:
        raise _RecordProblem(f"field {key!r} is empty")
    roles: dict[str, Role] = SHAREGPT_ROLES if key == "conversations" else {r: r for r in ROLES}
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _RecordProblem(f"{key}[{i}] must be an object, got {type(turn).__name__}")
        role = turn.get(role_key)
        if role not in roles:
            raise _RecordProblem(f"{key}[{i}].{role_key} must be one of {sorted(roles)}, got {role!r}")
        where = f"{key}[{i}]"
        calls = _turn_calls(turn, role, text_key, where)
        content = turn.get(text_key) if role != "function_call" else ""
        if images is not None:
            content = _content_with_images(content, f"{where}.{text_key}", images)
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise _RecordProblem(
                f"{where}.{text_key} must be a string, got {type(content).__name__}"
                if content is not None
                else f"{where} lacks {text_key!r}"
            )
        if roles[role] == "assistant" and not content.strip() and not calls:
            raise _RecordProblem(f"{where}.{text_key} is empty")
        message: Message = {"role": roles[role], "content": content}
        if calls:
            message["tool_calls"] = calls
        if roles[role] == "tool":
            message["tool_call_id"] = str(turn.get("tool_call_id", ""))
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise _RecordProblem(f"{key} has no assistant turn to train on")
    return messages


def _turn_calls(turn: dict[str, Any], role: str, text_key: str, where: str) -> list[ToolCallEntry]:
    """An assistant turn's calls: OpenAI ``tool_calls``, or a ShareGPT ``function_call`` turn's value."""
    if role == "function_call":
        raw = [_json_value(turn.get(text_key), f"{where}.{text_key}")]
        raw = raw[0] if isinstance(raw[0], list) else raw
        raw = [{"function": c} for c in raw]
    else:
        raw = turn.get("tool_calls") or []
        if raw and role != "assistant":
            raise _RecordProblem(f"{where}.tool_calls: only assistant turns carry tool calls")
    if not isinstance(raw, list):
        raise _RecordProblem(f"{where}.tool_calls must be a list")
    calls: list[ToolCallEntry] = []
    for j, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _RecordProblem(f"{where}.tool_calls[{j}] needs function.name")
        arguments = function.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        _json_value(text, f"{where}.tool_calls[{j}].function.arguments")
        calls.append(
            {
                "id": str(call.get("id", f"call_{j}")),
                "type": "function",
                "function": {"name": function["name"], "arguments": text},
            }
        )
    return calls


def _json_value(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise _RecordProblem(f"{where} is not valid JSON") from None


def record_tools(record: Any) -> tuple[ToolSpec, ...]:
    """A record's ``tools``: OpenAI function specs (a list, or its JSON text as ShareGPT data has it)."""
    if not isinstance(record, dict) or record.get("tools") in (None, "", []):
        return ()
    tools = _json_value(record["tools"], "tools")
    if not isinstance(tools, list):
        raise _RecordProblem("tools must be a list of function specs")
    specs = []
    for i, tool in enumerate(tools):
        spec = (
            tool if isinstance(tool, dict) and "function" in tool else {"type": "function", "function": tool}
        )
        if not isinstance(spec["function"], dict) or not isinstance(spec["function"].get("name"), str):
            raise _RecordProblem(f"tools[{i}] needs a function name")
        specs.append(spec)
    return tuple(specs)


def to_messages(
    record: Any, data_format: str, system_prompt: str | None, images: list[str] | None = None
) -> list[Message]:
    """One record of ``data_format`` as a conversation; raises _RecordProblem naming the field.

    ``images`` collects the record's image paths in placeholder order: image parts of ``messages``
    content, or the LLaMA-Factory / ShareGPT ``images`` column whose ``<image>`` marks in the text
    become placeholders (one mark per image)."""
    if not isinstance(record, dict):
        raise _RecordProblem(f"a record must be a JSON object, got {type(record).__name__}")
    if data_format == "messages":
        return _chat_list(record, "messages", "role", "content", images)
    if data_format == "sharegpt":
        turns = _chat_list(record, "conversations", "from", "value")
        column = record.get("images")
        if column is None or images is None:
            return turns
        if not isinstance(column, list) or not all(isinstance(p, str) for p in column):
            raise _RecordProblem("field 'images' must be a list of paths")
        marks = sum(m["content"].count(IMAGE_MARK) for m in turns)
        if marks != len(column):
            raise _RecordProblem(f"{marks} {IMAGE_MARK} marks in the text for {len(column)} images")
        images.extend(column)
        return [{**m, "content": m["content"].replace(IMAGE_MARK, IMAGE_PLACEHOLDER)} for m in turns]
    if data_format == "alpaca":
        instruction = _text_field(record, "instruction")
        extra = _text_field(record, "input", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        assistant = _text_field(record, "output")
        system = _text_field(record, "system", required=False) or system_prompt
    else:
        prompt_key, answer_key = FORMATS[data_format]
        user = _text_field(record, prompt_key)
        assistant = _text_field(record, answer_key)
        system = system_prompt
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# -- the whole pipeline --------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_examples(
    files: list[Path],
    tokenizer: PreTrainedTokenizerBase,
    *,
    data_format: DataFormat,
    max_length: int,
    system_prompt: str | None,
    issues: _Collector,
    formats: dict[str, str],
    prompt_template: str | None = None,
    image_processor: Any = None,
    tool_call_format: str | None = None,
) -> list[Example]:
    """Read, convert, render and length-check every record of ``files``; problems go to ``issues``.

    prompt_template: the user's chat template for chat-style data, None for the base's own (or, on a
    base without one, :data:`~lorayard.chat_format.DEFAULT_PROMPT_TEMPLATE`). image_processor: a
    vision-language base's (images are read from files next to the data); None: images are a problem.
    tool_call_format: the format forced for tool calls (the config's), None: the template's.
    """
    raw_completions = prompt_template is None and tokenizer.chat_template is None
    template = chat_template_for(tokenizer, prompt_template)
    tool_format = _tool_format(tokenizer, template, tool_call_format)
    examples = []
    for path in files:
        before = len(issues.issues)
        records = read_records(path, issues)
        if not records and len(issues.issues) == before:
            issues.add(str(path), "file holds no records")
        fmt = data_format if data_format != "auto" else detect_format(records)
        if fmt is None:
            if records:
                issues.add(
                    f"{path}",
                    "cannot detect the data format: records need one of "
                    + ", ".join(f"{name} ({'+'.join(keys)})" for name, keys in FORMATS.items())
                    + "; or set data_format",
                )
            continue
        formats[str(path)] = fmt
        for location, record in records:
            image_paths: list[str] = []
            try:
                messages = to_messages(record, fmt, system_prompt, image_paths)
                tools = record_tools(record)
                if raw_completions and fmt in COMPLETION_FORMATS:
                    rendered = render_completion(tokenizer, messages[-2]["content"], messages[-1]["content"])
                else:
                    uses_tools = tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
                    if uses_tools and isinstance(tool_format, UnknownToolFormat):
                        raise tool_format
                    context = (
                        ToolContext(tools, tool_format)
                        if isinstance(tool_format, ToolFormat)
                        else ToolContext()
                    )
                    rendered = render_conversation(
                        tokenizer, messages, prompt_template=template, tools=context
                    )
                images = None
                if image_paths:
                    rendered, images = _with_images(
                        rendered, image_paths, path.parent, image_processor, tokenizer
                    )
            except (_RecordProblem, ChatFormatError, UnknownToolFormat) as exc:
                issues.add(location, f"{exc} ({fmt} format)")
                continue
            if len(rendered) > max_length:
                issues.add(
                    location,
                    f"example is {len(rendered)} tokens, longer than max_length={max_length} "
                    f"(shorten it or raise max_length)",
                )
                continue
            examples.append(Example(location, path, messages, rendered, tools, images))
    return examples


def _with_images(
    rendered: RenderedExample,
    paths: list[str],
    folder: Path,
    processor: Any,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[RenderedExample, ExampleImages]:
    """The example's images read from files in ``folder`` (the data's) and each placeholder's pad
    token repeated once per image embedding (outside the loss, as the prompt is)."""
    if processor is None:
        raise _RecordProblem(
            "has images: only a vision-language base (Qwen2.5-VL, Qwen3-VL) trains on images"
        )
    root = folder.resolve()
    files = []
    for name in paths:
        file = (root / name).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            raise _RecordProblem(f"image {name!r} is not a file next to the data ({root})")
        files.append(file)
    try:
        decoded = [
            decode_image(file.read_bytes(), ImageLimits(max_images=len(files))).image for file in files
        ]
    except ImageError as exc:
        raise _RecordProblem(f"image: {exc}") from None
    pixels, grids = preprocess_images(processor, decoded)
    merge = int(processor.merge_size)
    counts = iter(t * h * w // (merge * merge) for t, h, w in grids)
    pad = tokenizer.get_vocab()[IMAGE_PAD]
    if sum(1 for t in rendered.ids if t == pad) != len(files):
        raise _RecordProblem("the text may not spell the image placeholder itself")
    ids: list[int] = []
    mask: list[int] = []
    for token, trained in zip(rendered.ids, rendered.labels_mask, strict=True):
        n = next(counts) if token == pad else 1
        ids.extend([token] * n)
        mask.extend([0 if token == pad else trained] * n)  # image tokens are never predicted
    return RenderedExample(ids, mask), ExampleImages(tuple(files), pixels, tuple(grids))


def _tool_format(
    tokenizer: PreTrainedTokenizerBase, template: str | None, override: str | None
) -> ToolFormat | UnknownToolFormat:
    """The call format of the template the data renders with, or ``override`` (the function the
    server chooses its format with, so the same flag gives the same format on both sides); an error
    is kept for records with tools."""
    try:
        return tool_format_for_template(template or tokenizer.chat_template, override)
    except UnknownToolFormat as exc:
        return exc


def split_validation(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded split: at least one example on each side."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [examples[i] for i in train], [examples[i] for i in val]


def prepare_config_data(
    config: TrainConfig, tokenizer: PreTrainedTokenizerBase, image_processor: Any = None
) -> PreparedData:
    """:func:`prepare_data` with every option taken from a training config (``image_processor``: a
    vision-language base's)."""
    return prepare_data(
        train_files=config.data,
        val_files=config.val_data,
        tokenizer=tokenizer,
        data_format=config.data_format,
        max_length=config.max_length,
        system_prompt=config.system_prompt,
        prompt_template=config.prompt_template,
        tool_call_format=config.tool_call_format,
        val_fraction=config.val_fraction,
        seed=config.seed,
        max_errors=config.max_data_errors,
        image_processor=image_processor,
    )


def prepare_data(
    *,
    train_files: list[Path],
    val_files: list[Path],
    tokenizer: PreTrainedTokenizerBase,
    data_format: DataFormat,
    max_length: int,
    system_prompt: str | None,
    val_fraction: float,
    seed: int,
    max_errors: int,
    prompt_template: str | None = None,
    image_processor: Any = None,
    tool_call_format: str | None = None,
) -> PreparedData:
    """Every file validated and rendered; raises DataError listing all problems (up to ``max_errors``)."""
    issues = _Collector(max_errors)
    formats: dict[str, str] = {}
    common: dict[str, Any] = {
        "data_format": data_format,
        "max_length": max_length,
        "system_prompt": system_prompt,
        "issues": issues,
        "formats": formats,
        "prompt_template": prompt_template,
        "image_processor": image_processor,
        "tool_call_format": tool_call_format,
    }
    train = load_examples(train_files, tokenizer, **common)
    validation = load_examples(val_files, tokenizer, **common)
    if not issues.issues:
        if not val_files and len(train) < 2:
            issues.add(
                ", ".join(map(str, train_files)),
                f"{len(train)} example(s): need at least 2 to hold one out for validation "
                "(or pass --val-data)",
            )
        elif val_files and not validation:
            issues.add(", ".join(map(str, val_files)), "no validation examples")
    if issues.issues:
        raise DataError(issues.issues)
    if not val_files:
        train, validation = split_validation(train, val_fraction, seed)
    datasets = [
        DatasetRef(
            path=str(path),
            sha256=_file_sha256(path),
            rows_train=sum(e.file == path for e in train),
            rows_validation=sum(e.file == path for e in validation),
        )
        for path in dict.fromkeys([*train_files, *val_files])
    ]
    with_tools = any(e.tools or any(m.get("tool_calls") for m in e.messages) for e in [*train, *validation])
    templated = tokenizer.chat_template is not None or prompt_template is not None
    uses_template = templated or any(f not in COMPLETION_FORMATS for f in formats.values())
    return PreparedData(
        train=train,
        validation=validation,
        datasets=datasets,
        formats=formats,
        prompt_template=chat_template_for(tokenizer, prompt_template) if uses_template else None,
        tool_format=(
            _recorded_tool_format(tokenizer, prompt_template, tool_call_format) if with_tools else None
        ),
    )


def _recorded_tool_format(
    tokenizer: PreTrainedTokenizerBase, prompt_template: str | None, override: str | None
) -> str:
    fmt = _tool_format(tokenizer, chat_template_for(tokenizer, prompt_template), override)
    assert isinstance(fmt, ToolFormat)  # records with tools were refused otherwise
    return fmt.name
