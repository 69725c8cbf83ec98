"""From engine token events to text and SSE: incremental detokenization, stop strings, event framing.

Multi-byte characters (Chinese, emoji) span several byte-level tokens; a delta is only released once
it decodes without a trailing U+FFFD, so no chunk ever carries half a character. Stop strings may
span chunks, so the last ``len(longest stop) - 1`` characters are held back until they can't start one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel

from lorayard.server.api.errors import error_body, status_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("lorayard.api")

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the text they add (possibly "" while incomplete).

    ``kept``: special tokens whose text stays in the output although special tokens are skipped: a
    tool format's markers (Mistral's ``[TOOL_CALLS]``), which the tool-call parser must see."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        skip_special_tokens: bool = True,
        kept: frozenset[int] = frozenset(),
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.kept = kept if skip_special_tokens else frozenset()
        self.ids: list[int] = []
        self._prefix = 0  # ids before this index are fully emitted and only kept as context
        self._read = 0  # ids before this index have produced their text

    def _decode(self, ids: list[int]) -> str:
        if not self.kept.intersection(ids):
            return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))
        # Each kept token is its own text; the runs between them decode as usual.
        text = ""
        run: list[int] = []
        for token_id in ids:
            if token_id in self.kept:
                text += str(self.tokenizer.decode(run, skip_special_tokens=True)) if run else ""
                text += str(self.tokenizer.decode([token_id], skip_special_tokens=False))
                run = []
            else:
                run.append(token_id)
        return text + (str(self.tokenizer.decode(run, skip_special_tokens=True)) if run else "")

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of the output: the text of tokens still held back, an incomplete UTF-8 sequence
        that max_tokens cut, as the tokenizer's decode gives it (U+FFFD for the missing bytes), so
        the streamed text always equals the decode of every token rather than losing the tail."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        """The text the unreleased ids add; held back (``""``) while it ends in an incomplete
        character, unless ``final``."""
        if self._read == len(self.ids):
            return ""
        # Decode with a little left context so tokenizers that strip leading spaces behave.
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        complete = len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT)
        if not (complete or final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return full_text[len(prefix_text) :]


@dataclass
class StopStringFilter:
    """Holds back text that could be the start of a stop string; reports when one is hit."""

    stops: list[str]
    text: str = ""
    sent: int = 0
    stopped: bool = field(default=False)

    def push(self, delta: str) -> str:
        """Add decoded text; return what is safe to send now."""
        if self.stopped:
            return ""
        self.text += delta
        if not self.stops:
            return self._release(len(self.text))
        longest = max(len(s) for s in self.stops)
        search_from = max(0, self.sent - longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._release(len(self.text))
        return self._release(max(self.sent, len(self.text) - longest + 1))

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return out


def sse_event(payload: BaseModel | dict) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else _json(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _json(payload: dict) -> str:
    import json

    return json.dumps(payload, ensure_ascii=False)


async def sse_stream(chunks: AsyncIterator[BaseModel], on_error: list[int]) -> AsyncIterator[str]:
    """Frame chunks as SSE, ending with ``[DONE]``. A failure after the headers went out cannot change
    the HTTP status: it is sent as an OpenAI error event (and its status appended to ``on_error``)."""
    try:
        async for chunk in chunks:
            yield sse_event(chunk)
    except Exception as exc:
        record_stream_failure(exc, on_error, "stream")
        yield sse_event(error_body(exc))
    yield SSE_DONE


def record_stream_failure(exc: Exception, on_error: list[int], stream: str) -> None:
    """The bookkeeping of a failure after a stream's 200 header went out (chat, completions and
    /v1/responses streams alike): its status appended to ``on_error`` (the request counter reads it
    once the stream ends), and logged when it is the server's fault (5xx); ``stream`` names it in the log."""
    status, _ = status_of(exc)
    if status >= 500:
        log.error("%s failed: %r", stream, exc)
    on_error.append(status)
