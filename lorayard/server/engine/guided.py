"""Structured output: a request's :class:`GuidedDecoding` compiled to a token grammar, a matcher per
sequence, and the token mask the sampler applies to that sequence's row.

The grammar work is xgrammar's, chosen by measurement (``python -m bench.grammar``, results in
bench/results/grammar/): on the CPU, for our 49152-token vocabulary and a typical JSON schema, its
mask fill + accept costs a few microseconds per token, several times less than llguidance's (whose
lazily built masks spike to tenths of a millisecond) and outlines-core's (whose schema compile takes
a second or more, and a plain JSON object grammar tens of seconds); it compiles a schema in 10-40 ms.

Semantics:

- ``json_object``: any JSON object; ``json_schema``: JSON valid against the schema. xgrammar's strict
  mode: properties and items the schema does not name are not generated (still valid output).
- ``structural_tag``: xgrammar's structural tag (tool calls: free text, then calls whose arguments are
  JSON valid against each tool's schema); every JSON schema inside it is checked and bounded as above.
- Whitespace between elements is free up to :data:`MAX_WHITESPACE` characters per gap, so a model
  cannot loop on whitespace until max_tokens.
- The mask allows the engine's end-of-turn tokens only once the document is complete; the row
  finishes ("stop") when the grammar terminates: its end-of-turn token accepted or, on an engine
  without end-of-turn tokens, the document complete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
import xgrammar

from lorayard.server.engine.types import GuidedDecoding, InvalidRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

JSON_OBJECT_SCHEMA = '{"type": "object"}'
"""``json_object`` is the JSON schema of any object."""
MAX_WHITESPACE = 32
"""Whitespace characters allowed between two JSON elements (pretty printing to depth ~15 fits)."""
CACHE_LIMIT_BYTES = 256 * 2**20
"""xgrammar's compile cache (keyed by schema text), bounded: a flood of distinct schemas evicts."""
COMPILE_THREADS = 2

UNENFORCED_KEYWORDS = frozenset(
    {"not", "uniqueItems", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies"}
)
"""Keywords xgrammar 0.2 compiles but does not enforce (checked: its matcher accepts documents that
break them); a schema using one is refused rather than served output that may not validate."""
_SUBSCHEMA = (
    "items",
    "additionalProperties",
    "contains",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
    "additionalItems",
)
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")

_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")
"""xgrammar's C++ errors start with a timestamp, a source location and an assertion text."""


class GuidedCompiler:
    """Compiles :class:`GuidedDecoding` for one tokenizer; thread-safe, cached by schema text.

    The first compile of a schema takes milliseconds to tens of ms: the API may call :meth:`compile`
    through ``asyncio.to_thread`` before ``Engine.submit`` (which then finds it cached).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Iterable[int]
    ) -> None:
        """vocab_size: the width of the model's logits (the mask's), which may exceed the tokenizer's."""
        self.vocab_size = vocab_size
        stops = sorted(stop_token_ids)
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stops or None
        )
        self._compiler = xgrammar.GrammarCompiler(
            info, max_threads=COMPILE_THREADS, cache_enabled=True, cache_limit_bytes=CACHE_LIMIT_BYTES
        )
        # Without end-of-turn tokens the engine never stops on one, so the grammar ends the row.
        self._terminate_when_complete = not stops

    def compile(self, guided: GuidedDecoding) -> xgrammar.CompiledGrammar:
        """Raises InvalidRequest (param ``guided``) with xgrammar's reason for a schema it cannot use."""
        if guided.kind == "structural_tag":
            return self._compile_structural_tag(guided.schema or "{}")
        if guided.kind == "json_object":
            schema = JSON_OBJECT_SCHEMA
        elif guided.schema is None:
            raise InvalidRequest("json_schema structured output needs a schema", "guided")
        else:
            schema = guided.schema
            problem = _unenforced(schema)
            if problem is not None:
                raise InvalidRequest(
                    f"structured output cannot enforce {problem} in the JSON schema", "guided"
                )
        try:
            return self._compiler.compile_json_schema(
                schema, any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE
            )
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = _LOG_PREFIX.sub("", str(exc)).strip()
            raise InvalidRequest(
                f"the JSON schema cannot be used for structured output: {reason}", "guided"
            ) from exc

    def _compile_structural_tag(self, text: str) -> xgrammar.CompiledGrammar:
        tag = json.loads(text)
        for node in _json_schema_formats(tag):
            problem = _unenforced(json.dumps(node["json_schema"]))
            if problem is not None:
                raise InvalidRequest(
                    f"structured output cannot enforce {problem} in a tool's schema", "guided"
                )
            node["max_whitespace_cnt"] = MAX_WHITESPACE
        try:
            return self._compiler.compile_structural_tag(json.dumps(tag))
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = _LOG_PREFIX.sub("", str(exc)).strip()
            raise InvalidRequest(
                f"the tool schemas cannot be used for tool calls: {reason}", "guided"
            ) from exc

    def matcher(self, guided: GuidedDecoding) -> GuidedMatcher:
        """A fresh matcher for one sequence (compiling the grammar on first use)."""
        compiled = self.compile(guided)
        return GuidedMatcher(
            xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=self._terminate_when_complete),
            self.vocab_size,
        )


class GuidedMatcher:
    """One sequence's grammar state and its next-token mask.

    The engine calls :meth:`fill` (on its grammar thread, while the forward pass runs), then, on the
    engine thread, the sampler calls :meth:`apply` and the engine :meth:`accept`; never two at once.
    """

    def __init__(self, matcher: xgrammar.GrammarMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._mask = xgrammar.allocate_token_bitmask(1, vocab_size)  # [1, ceil(vocab / 32)] int32, CPU
        self._restricts = True
        self._error: Exception | None = None

    def fill(self) -> None:
        """Compute the mask for the next token; an error is kept and raised by :meth:`apply`, so it
        fails this sequence alone."""
        try:
            self._restricts = self._matcher.fill_next_token_bitmask(self._mask, 0)
            self._error = None
        except Exception as exc:
            self._error = exc

    def apply(self, logits: torch.Tensor) -> None:
        """logits: [vocab] float32 of this sequence's row, on any device: disallowed tokens -> -inf."""
        if self._error is not None:
            raise self._error
        if not self._restricts:  # every token allowed here
            return
        mask = self._mask.to(logits.device, non_blocking=True)
        # xgrammar's C++ kernel on the CPU; plain torch ops elsewhere (its Triton kernel would need a
        # C compiler at run time, which the slim images do not have).
        backend: Literal["cpu", "torch_native"] = "cpu" if logits.device.type == "cpu" else "torch_native"
        xgrammar.apply_token_bitmask_inplace(logits[None], mask, vocab_size=self.vocab_size, backend=backend)

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(token_id):
            raise RuntimeError(f"the grammar refused token {token_id}")

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()


def _json_schema_formats(node: Any) -> Iterator[dict[str, Any]]:
    """The ``json_schema`` formats inside a structural tag (as mutable dicts)."""
    if isinstance(node, list):
        for child in node:
            yield from _json_schema_formats(child)
    elif isinstance(node, dict):
        if node.get("type") == "json_schema" and "json_schema" in node:
            yield node
            return
        for child in node.values():
            yield from _json_schema_formats(child)


def _unenforced(schema_text: str) -> str | None:
    """The first keyword of the schema that xgrammar would not enforce and where it is, or None
    (unparsable JSON is left to xgrammar's own message)."""
    try:
        schema = json.loads(schema_text)
    except ValueError:
        return None
    for path, node in _subschemas(schema, "#"):
        found = sorted(UNENFORCED_KEYWORDS & node.keys())
        if found:
            return f"'{found[0]}' (at {path})"
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            return f"'allOf' with more than one schema (at {path})"
    return None


def _subschemas(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object in a JSON schema (keywords' positions only: a property named "not" is not
    the keyword), with its JSON-pointer-like path."""
    if not isinstance(node, dict):
        return
    yield path, node
    for key in _SUBSCHEMA:
        yield from _subschemas(node.get(key), f"{path}/{key}")
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, child in enumerate(node[key]):
                yield from _subschemas(child, f"{path}/{key}/{i}")
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, child in node[key].items():
                yield from _subschemas(child, f"{path}/{key}/{name}")
