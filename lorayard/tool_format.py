"""How a base spells a tool call in text: the call formats both training and serving render and parse.

A :class:`ToolFormat` is the literal text around one call::

    head + NAME + arguments_field + ARGUMENTS_JSON + end

Training renders assistant ``tool_calls`` with it (through :mod:`lorayard.chat_format`), the server
constrains generation to it once ``trigger`` appears (xgrammar structural tags) and parses it back into
OpenAI ``tool_calls``. A format is chosen from the chat template (:func:`tool_format_for_template`):
a template that writes ``<tool_call>`` is Hermes/Qwen, one that writes ``<|python_tag|>`` or an
``ipython`` role is Llama 3 JSON, one that writes ``[TOOL_CALLS]`` and ``[ARGS]`` is Mistral's (v11+);
a template that knows no tools at all (SmolLM2's) gets our default, Hermes, with the tool schemas in
the system turn (:func:`tools_system_text`) and tool results as a user turn in ``<tool_response>``
tags, as Qwen's own template writes them.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class ToolFormat:
    """The text of one call. ``trigger`` starts every call (a prefix of ``head``): text before it is
    content, and from it on the output is a call."""

    name: str
    trigger: str
    head: str
    arguments_field: str
    end: str
    separator: str
    """Between two calls of one turn."""

    def render_call(self, name: str, arguments: str) -> str:
        """One call as the model writes it; ``arguments``: JSON text (re-serialised compactly when it
        parses, so training data written with any spacing renders as the server parses it)."""
        with contextlib.suppress(ValueError):
            arguments = json.dumps(json.loads(arguments), ensure_ascii=False)
        return f"{self.head}{name}{self.arguments_field}{arguments}{self.end}"

    def call_prefix(self, name: str) -> str:
        """What precedes the arguments of a call to ``name``."""
        return f"{self.head}{name}{self.arguments_field}"


HERMES = ToolFormat(
    name="hermes",
    trigger="<tool_call>",
    head='<tool_call>\n{"name": "',
    arguments_field='", "arguments": ',
    end="}\n</tool_call>",
    separator="\n",
)
"""Hermes / Qwen 2.5-3, and our default: ``<tool_call>`` NL ``{"name": ..., "arguments": {...}}`` NL
``</tool_call>``."""

LLAMA3_JSON = ToolFormat(
    name="llama3_json",
    trigger='{"name": ',
    head='{"name": "',
    arguments_field='", "parameters": ',
    end="}",
    separator="; ",
)
"""Llama 3.1-3.3's JSON tool calls: ``{"name": ..., "parameters": {...}}``."""

MISTRAL = ToolFormat(
    name="mistral",
    trigger="[TOOL_CALLS]",
    head="[TOOL_CALLS]",
    arguments_field="[ARGS]",
    end="",
    separator="",
)
"""Mistral's calls since its v11 tokenizer (Mistral Small 3.1+, Magistral, Devstral, Ministral 3):
``[TOOL_CALLS]NAME[ARGS]{...}``, each call of a turn with its own ``[TOOL_CALLS]``. Both markers are
special tokens in Mistral's tokenizers (:func:`lorayard.server.api.tool_calls.marker_token_ids`)."""

ToolFormatName = Literal["hermes", "llama3_json", "mistral"]
"""The formats ``--tool-call-format`` (server and training) may name: the keys of :data:`TOOL_FORMATS`."""

TOOL_FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}
DEFAULT_TOOL_FORMAT = HERMES


class UnknownToolFormat(ValueError):
    """A chat template that writes tool calls in a format we cannot parse (Mistral v3's JSON list
    after ``[TOOL_CALLS]``, ...)."""


class ToolFormatConflict(UnknownToolFormat):
    """A forced format that contradicts another: the one a chat template writes its calls in, or the
    one an adapter version was trained in."""


def version_tool_format(trained: str | None, forced: str | None, base: ToolFormat) -> ToolFormat:
    """The format an adapter version's tool requests are served in: the one it was trained in (its
    manifest's ``tool_format``), so its prompt, grammar and parser are what training rendered; a
    version that records none (trained before formats were recorded, or without tool data): ``base``,
    the base's format. ``forced``: the server's ``--tool-call-format``; when it names another format
    than the version was trained in, neither can be right for that version: refused, not guessed."""
    if trained is None:
        return base
    if forced is not None and forced != trained:
        raise ToolFormatConflict(
            f"it was trained with tool-call format {trained!r} (its manifest), but this server forces "
            f"{forced!r} (--tool-call-format): serve it where the flag is {trained!r} or unset, or retrain "
            f"it with --tool-call-format {forced}"
        )
    if trained not in TOOL_FORMATS:
        raise ToolFormatConflict(
            f"it was trained with tool-call format {trained!r}, which this server does not know "
            f"(one of {sorted(TOOL_FORMATS)})"
        )
    return TOOL_FORMATS[trained]


def template_knows_tools(template: str | None) -> bool:
    """Whether a Jinja chat template renders ``tools`` itself (else we render them: the default format)."""
    return template is not None and "tools" in template


def tool_format_for_template(template: str | None, override: str | None = None) -> ToolFormat:
    """The call format of a chat template: recognised from the template's text (a template without
    tools gets :data:`DEFAULT_TOOL_FORMAT`), or ``override`` (a :data:`TOOL_FORMATS` key, the
    ``--tool-call-format`` flag of the server and of training). The override chooses the format of a
    template without tools support (we render the calls) or one whose format we do not recognise;
    a template that writes its calls in a format we recognise writes them so whatever the flag says,
    so an override naming another one is refused (:class:`ToolFormatConflict`): its calls would be
    rendered one way and parsed another."""
    if override is not None:
        if override not in TOOL_FORMATS:
            raise UnknownToolFormat(f"unknown tool-call format {override!r}; one of {sorted(TOOL_FORMATS)}")
        return _checked_override(template, TOOL_FORMATS[override])
    return _recognised_format(template)


def _checked_override(template: str | None, override: ToolFormat) -> ToolFormat:
    try:
        recognised = _recognised_format(template) if template_knows_tools(template) else None
    except UnknownToolFormat:
        recognised = None
    if recognised is not None and recognised != override:
        raise ToolFormatConflict(
            f"the chat template writes tool calls in the {recognised.name!r} format, which "
            f"--tool-call-format {override.name} contradicts: leave the flag unset (or set it to "
            f"{recognised.name})"
        )
    return override


def _recognised_format(template: str | None) -> ToolFormat:
    if not template_knows_tools(template):
        return DEFAULT_TOOL_FORMAT
    assert template is not None
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3_JSON
    if "[TOOL_CALLS]" in template:
        return _mistral_format(template)
    raise UnknownToolFormat(
        "the chat template writes tool calls in a format we do not parse (one of "
        f"{sorted(TOOL_FORMATS)} can be forced with --tool-call-format)"
    )


def _mistral_format(template: str) -> ToolFormat:
    """Mistral's v11+ calls; the older spellings are refused, not parsed as something else: v3's (Mistral
    7B v0.3, Nemo) one JSON list of calls after ``[TOOL_CALLS]``, v7's (Large 2411) ``[CALL_ID]``."""
    if "[ARGS]" in template and "[CALL_ID]" not in template:
        return MISTRAL
    spelling = "[CALL_ID] inside each call" if "[CALL_ID]" in template else "a JSON list after [TOOL_CALLS]"
    raise UnknownToolFormat(
        f"the chat template writes Mistral's older tool calls ({spelling}), which we do not parse; "
        "we parse Mistral's v11+ [TOOL_CALLS]name[ARGS]{...} (one of "
        f"{sorted(TOOL_FORMATS)} can be forced with --tool-call-format)"
    )


def tools_system_text(tools: list[dict[str, Any]], fmt: ToolFormat) -> str:
    """The tool schemas and the call syntax, appended to the system turn (Qwen 2.5's own wording)."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    example = f"{fmt.head}<function-name>{fmt.arguments_field}<args-json-object>{fmt.end}"
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments in this "
        f"format:\n{example}"
    )


def tool_response_text(contents: list[str]) -> str:
    """Tool results as the user turn that carries them back (consecutive results in one turn)."""
    return "\n".join(f"<tool_response>\n{content}\n</tool_response>" for content in contents)
