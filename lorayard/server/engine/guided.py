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

import asyncio
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import torch
import xgrammar

from lorayard.server.engine.guided_schema import unenforced
from lorayard.server.engine.types import GuidedDecoding, InvalidRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CompileOutcome = Literal["compiled", "invalid", "timeout", "abandoned"]

JSON_OBJECT_SCHEMA = '{"type": "object"}'
"""``json_object`` is the JSON schema of any object."""
MAX_WHITESPACE = 32
"""Whitespace characters allowed between two JSON elements (pretty printing to depth ~15 fits)."""
CACHE_LIMIT_BYTES = 256 * 2**20
"""Our compiled-grammar cache (keyed by schema text), bounded by the grammars' own memory sizes: a
flood of distinct schemas evicts the least recently used. Ours, not xgrammar's: with its cache on, a
30k-string enum compiled 9x slower (64 s against 7 s, xgrammar 0.2.9) and a 5k one 2x."""
COMPILE_THREADS = 2

_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")
"""xgrammar's C++ errors start with a timestamp, a source location and an assertion text."""


class GuidedCompiler:
    """Compiles :class:`GuidedDecoding` for one tokenizer; thread-safe, cached by schema text.

    The first compile of a schema takes milliseconds to tens of ms (a large schema much longer): the
    API awaits :meth:`compile_bounded` before ``Engine.submit`` (which then finds it cached).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        compile_threads: int = COMPILE_THREADS,
        count: Callable[[CompileOutcome], None] | None = None,
    ) -> None:
        """vocab_size: the width of the model's logits (the mask's), which may exceed the tokenizer's;
        compile_threads: compiles that run at once on this compiler's own pool; count: told each
        :meth:`compile_bounded` outcome (the server's metric)."""
        self.vocab_size = vocab_size
        self._count = count or (lambda _outcome: None)
        # Its own pool, not asyncio's default executor: a flood of slow compiles must not hold up
        # adapter loading or the volume poll, which run there.
        self._pool = ThreadPoolExecutor(max_workers=compile_threads, thread_name_prefix="grammar-compile")
        stops = sorted(stop_token_ids)
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stops or None
        )
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_enabled=False)
        self._cache: OrderedDict[str, xgrammar.CompiledGrammar] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()  # compile threads and the event loop share the cache
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
        with self._cache_lock:  # only grammars that passed every check are cached
            cached = self._cache.get(schema)
            if cached is not None:
                self._cache.move_to_end(schema)
                return cached
        problem = _unenforced(schema)
        if problem is not None:
            raise InvalidRequest(f"structured output cannot enforce {problem} in the JSON schema", "guided")
        return self._compile(
            schema,
            "the JSON schema cannot be used for structured output",
            lambda: self._compiler.compile_json_schema(
                schema, any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE
            ),
        )

    def _compile(
        self, key: str, refusal: str, compile_: Callable[[], xgrammar.CompiledGrammar]
    ) -> xgrammar.CompiledGrammar:
        """Run ``compile_``, cache its grammar under ``key``; xgrammar's error becomes a 400 that starts
        with ``refusal`` (its log prefix stripped)."""
        try:
            compiled = compile_()
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = _LOG_PREFIX.sub("", str(exc)).strip()
            raise InvalidRequest(f"{refusal}: {reason}", "guided") from exc
        self._remember(key, compiled)
        return compiled

    def _remember(self, schema: str, compiled: xgrammar.CompiledGrammar) -> None:
        with self._cache_lock:
            if schema in self._cache:
                return
            self._cache[schema] = compiled
            self._cache_bytes += compiled.memory_size_bytes
            while self._cache_bytes > CACHE_LIMIT_BYTES and len(self._cache) > 1:
                _, evicted = self._cache.popitem(last=False)
                self._cache_bytes -= evicted.memory_size_bytes

    async def compile_bounded(self, guided: GuidedDecoding, timeout_s: float) -> None:
        """Compile on this compiler's pool: a compile still waiting for a thread never runs if the
        caller is cancelled (its client went); one running past ``timeout_s`` raises TimeoutError
        (xgrammar cannot be interrupted: it finishes on its thread, bounded by the schema size limit,
        and its grammar is cached for a retry). Raises InvalidRequest as :meth:`compile`."""
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def run() -> xgrammar.CompiledGrammar:
            loop.call_soon_threadsafe(started.set)
            return self.compile(guided)

        future = self._pool.submit(run)
        try:
            await started.wait()  # its turn; the time limit is the compile's, not the queue's
            await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.CancelledError:
            if future.cancel():  # still waiting for a thread: it never runs
                self._count("abandoned")
            raise
        except InvalidRequest:
            self._count("invalid")
            raise
        except TimeoutError:
            self._count("timeout")
            raise
        self._count("compiled")

    def close(self) -> None:
        """Stop taking compiles; those waiting for a thread are dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile_structural_tag(self, text: str) -> xgrammar.CompiledGrammar:
        key = "structural_tag:" + text  # never equal to a JSON schema's text, which starts with "{"
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        tag = json.loads(text)
        for node in _json_schema_formats(tag):
            problem = _unenforced(json.dumps(node["json_schema"]))
            if problem is not None:
                raise InvalidRequest(
                    f"structured output cannot enforce {problem} in a tool's schema", "guided"
                )
            node["max_whitespace_cnt"] = MAX_WHITESPACE
        return self._compile(
            key,
            "the tool schemas cannot be used for tool calls",
            lambda: self._compiler.compile_structural_tag(json.dumps(tag)),
        )

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


def grammar_text(guided: GuidedDecoding) -> str:
    """The grammar :meth:`GuidedCompiler.compile` compiles for ``guided``, as xgrammar's EBNF text:
    what ``--engine vllm`` hands vLLM's structured outputs, so both engines enforce the same grammar
    (whitespace bound included). Call it after :meth:`GuidedCompiler.compile` accepted ``guided``."""
    if guided.kind == "structural_tag":
        tag = json.loads(guided.schema or "{}")
        for node in _json_schema_formats(tag):
            node["max_whitespace_cnt"] = MAX_WHITESPACE
        return str(xgrammar.Grammar.from_structural_tag(json.dumps(tag)))
    schema = JSON_OBJECT_SCHEMA if guided.kind == "json_object" else guided.schema
    if schema is None:
        raise InvalidRequest("json_schema structured output needs a schema", "guided")
    return str(
        xgrammar.Grammar.from_json_schema(schema, any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE)
    )


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
    """The first keyword of the schema structured output would not enforce, and where it is, or None
    (unparsable JSON is left to xgrammar's own message)."""
    try:
        schema = json.loads(schema_text)
    except ValueError:
        return None
    return unenforced(schema)
