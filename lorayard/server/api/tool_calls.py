"""Tool calling, for any endpoint: which tools a request may call, the grammar of their calls, and the
parser that turns a choice's output text back into content and OpenAI tool calls, whole or streamed.

The calls are written in the base's own format (:mod:`lorayard.tool_format`). Generation is
constrained by an xgrammar structural tag: with ``tool_choice`` ``auto`` the text is free until the
format's trigger (``<tool_call>``), then the call must be one of the tools' names and arguments valid
against its schema, so every call we return parses and validates (except one cut by ``max_tokens``).
``required`` is one or more calls and nothing else, a named choice exactly that call. With
``response_format`` and ``auto``, the output is either calls or a text answer valid against the format.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lorayard.chat_format import ToolContext, ToolSpec
from lorayard.server.api.errors import APIError
from lorayard.server.api.protocol import NamedToolChoice, Tool
from lorayard.server.engine.types import GuidedDecoding
from lorayard.tool_format import ToolFormat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice | None


@dataclass(frozen=True)
class ToolCalling:
    """A request's tools: all of them are shown to the model, ``callable`` may be called."""

    format: ToolFormat
    tools: tuple[ToolSpec, ...]
    callable: tuple[str, ...]
    mode: Literal["auto", "required", "named"]
    parallel: bool
    parameters: dict[str, dict[str, Any]]
    """Each callable tool's JSON schema."""

    @property
    def context(self) -> ToolContext:
        """What the prompt renders."""
        return ToolContext(self.tools, self.format)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def tool_calling(
    tools: list[Tool] | None, choice: ToolChoice, parallel: bool | None, fmt: ToolFormat
) -> ToolCalling | None:
    """``tools`` + ``tool_choice`` (+ ``parallel_tool_calls``, default true) -> the calls allowed, or
    None when there are no tools or ``tool_choice`` is ``"none"``. A bad combination is a 400 naming
    the field. The schemas are checked by the caller (lorayard.server.api.serving, with the other schemas)."""
    if not tools:
        if isinstance(choice, NamedToolChoice) or choice == "required":
            raise _bad("tool_choice", "names a tool but `tools` is empty")
        return None
    if choice == "none":
        return None
    by_name: dict[str, Tool] = {}
    for i, tool in enumerate(tools):
        name = tool.function.name
        if name in by_name:
            raise _bad(f"tools.{i}.function.name", f"{name!r} is defined twice")
        by_name[name] = tool
    mode: Literal["auto", "required", "named"] = "auto" if choice is None else "required"
    names = tuple(by_name)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in by_name:
            raise _bad("tool_choice.function.name", f"{choice.function.name!r} is not one of the tools")
        mode, names = "named", (choice.function.name,)
    elif choice == "auto":
        mode = "auto"
    specs = tuple(t.model_dump(mode="json", exclude_none=True, by_alias=True) for t in tools)
    return ToolCalling(
        format=fmt,
        tools=specs,
        callable=names,
        mode=mode,
        parallel=parallel is not False and mode != "named",
        parameters={name: by_name[name].function.parameters for name in names},
    )


def tool_grammar(calling: ToolCalling, text_schema: str | None) -> GuidedDecoding:
    """The structural tag of the calls (xgrammar's JSON); ``text_schema``: JSON Schema text a text
    answer must satisfy (``response_format`` with ``auto``), None: free text."""
    fmt = calling.format
    tags = [
        {
            "type": "tag",
            "begin": fmt.call_prefix(name),
            "content": {"type": "json_schema", "json_schema": calling.parameters[name]},
            "end": fmt.end,
        }
        for name in calling.callable
    ]
    calls: dict[str, Any] = {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": fmt.separator,
        "at_least_one": True,
        "stop_after_first": not calling.parallel,
    }
    grammar: dict[str, Any]
    if calling.mode == "named":
        grammar = tags[0]
    elif calling.mode == "required":
        grammar = calls
    elif text_schema is not None:
        grammar = {
            "type": "or",
            "elements": [{"type": "json_schema", "json_schema": json.loads(text_schema)}, calls],
        }
    else:
        grammar = {
            "type": "triggered_tags",
            "triggers": [fmt.trigger],
            "tags": tags,
            "stop_after_first": not calling.parallel,
        }
    return GuidedDecoding("structural_tag", json.dumps({"type": "structural_tag", "format": grammar}))


def marker_token_ids(tokenizer: PreTrainedTokenizerBase, fmt: ToolFormat) -> frozenset[int]:
    """The special tokens that spell the format's markers (Mistral's ``[TOOL_CALLS]`` and ``[ARGS]``):
    decoding skips special tokens, so these are kept, or the parser would never see a call start."""
    markers = (fmt.trigger, fmt.head, fmt.arguments_field, fmt.end, fmt.separator)
    return frozenset(
        token_id
        for token_id, token in tokenizer.added_tokens_decoder.items()
        if token.special and any(token.content in marker for marker in markers)
    )


# -- parsing the output --------------------------------------------------------------------------
@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStarted:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


ToolEvent = ContentDelta | CallStarted | ArgumentsDelta


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""
    """JSON text as generated; a call cut by max_tokens keeps the part that came."""
    complete: bool = False


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCallParser:
    """A choice's output text, pushed as it comes -> content and calls, as events in order.

    Concatenating the events gives the whole answer (:attr:`content`, :attr:`calls`), so a streamed
    choice and a whole one are the same by construction. Whitespace between content and a call (the
    format's own newlines) is not content; the trigger text never is.
    """

    format: ToolFormat
    names: tuple[str, ...]
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    _state: Literal["text", "head", "arguments", "end"] = "text"
    _buffer: str = ""
    _held_space: str = ""
    _arguments_start: int | None = None

    def push(self, text: str) -> list[ToolEvent]:
        self._buffer += text
        events: list[ToolEvent] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[ToolEvent]:
        """The end of the output (stop or length): what is held back, and a call cut short."""
        events: list[ToolEvent] = []
        if self._state == "head":
            name = self._cut_call_name()
            if name is None:  # the tool cannot be told: the text stays what it was
                self._state = "text"
                self._held_space = ""
                events += self._content(self._buffer, final=True)
            else:
                events.append(self._start(name))
        elif self._state == "text" and not (self.calls and self.format.trigger.startswith(self._buffer)):
            events += self._content(self._buffer, final=True)
        # else: after a call, a trigger cut short (``[TOOL_CA``) is the next call's start, never content
        self._buffer = ""
        return events

    # The machine: each step consumes a prefix of the buffer, or returns False to wait for more.
    def _step(self, events: list[ToolEvent]) -> bool:
        fmt, buffer = self.format, self._buffer
        if self._state == "text":
            at = buffer.find(fmt.trigger)
            if at < 0:
                keep = _partial_suffix(buffer, fmt.trigger)
                events += self._content(buffer[: len(buffer) - keep])
                self._buffer = buffer[len(buffer) - keep :]
                return False
            events += self._content(buffer[:at])
            self._held_space = ""  # the format's own whitespace before a call
            self._buffer, self._state = buffer[at:], "head"
            return True
        if self._state == "head":
            if not buffer.startswith(fmt.head):
                return False
            at = buffer.find(fmt.arguments_field, len(fmt.head))
            if at < 0:
                return False
            events.append(self._start(buffer[len(fmt.head) : at]))
            self._buffer, self._state = buffer[at + len(fmt.arguments_field) :], "arguments"
            return True
        if self._state == "arguments":
            return self._arguments(events)
        stripped = buffer.lstrip()
        if stripped.startswith(fmt.end):
            self._buffer, self._state = stripped[len(fmt.end) :], "text"
            return True
        return False

    def _start(self, name: str) -> CallStarted:
        call = ParsedCall(_call_id(), name)
        self.calls.append(call)
        self._arguments_start = None
        return CallStarted(len(self.calls) - 1, call.id, name)

    def _arguments(self, events: list[ToolEvent]) -> bool:
        """Arguments stream as they come; the JSON value's end (a decode that completes) ends them."""
        buffer, call = self._buffer, self.calls[-1]
        start = len(buffer) - len(buffer.lstrip())
        if start == len(buffer):
            return False
        try:
            value, end = json.JSONDecoder().raw_decode(buffer, start)
        except ValueError:
            end = None
        # A bare number may still go on ("12" before "3"): complete only once something follows it.
        if end is not None and (isinstance(value, dict | list | str) or end < len(buffer)):
            self._emit_arguments(events, buffer[start:end])
            call.complete = True
            self._buffer, self._state = buffer[end:], "end"
            return True
        self._emit_arguments(events, buffer[start:])
        return False

    def _emit_arguments(self, events: list[ToolEvent], text: str) -> None:
        call = self.calls[-1]
        new = text[len(call.arguments) :]
        if new:
            call.arguments += new
            events.append(ArgumentsDelta(len(self.calls) - 1, new))

    def _cut_call_name(self) -> str | None:
        """A call cut inside its header: its tool when the part that came names exactly one."""
        fmt, buffer = self.format, self._buffer
        partial = buffer[len(fmt.head) :] if buffer.startswith(fmt.head) else ""
        matching = [n for n in self.names if n.startswith(partial)]
        return matching[0] if len(matching) == 1 else None

    def _content(self, text: str, *, final: bool = False) -> list[ToolEvent]:
        """Content, with trailing whitespace held until more content follows (it may be the format's
        newline before a call); at the end it is content only in an answer without calls."""
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = text[len(body) :]
        if final and not self.calls:
            body, self._held_space = text, ""
        if not body:
            return []
        self.content += body
        return [ContentDelta(body)]


def _partial_suffix(text: str, trigger: str) -> int:
    """The length of the longest end of ``text`` that could begin ``trigger``."""
    for size in range(min(len(trigger) - 1, len(text)), 0, -1):
        if trigger.startswith(text[-size:]):
            return size
    return 0
