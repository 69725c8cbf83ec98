"""The rules every request obeys, written once: the API applies them to a body (naming the body's
fields, answering 400) and :meth:`Engine.submit` applies them again as its last guard, so the two can
never disagree. Torch-free."""

from __future__ import annotations

from collections.abc import Iterable

from lorayard.server.engine.types import GuidedDecoding, InvalidRequest, PromptTooLong


def check_token_ids(field: str, ids: Iterable[int], vocab_size: int) -> None:
    """Every id a request carries indexes a tensor row: it must be in ``[0, vocab_size)``."""
    bad = next((token for token in ids if not 0 <= token < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"{field}: token id {bad} is outside the vocabulary [0, {vocab_size})", field)


def check_context(prompt_len: int, max_tokens: int, window: int) -> None:
    """The prompt and everything it may generate fit the context window."""
    if prompt_len + max_tokens > window:
        raise PromptTooLong(
            f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the context window"
            f" of {window} tokens"
        )


def default_max_tokens(prompt_len: int, limit: int, window: int) -> int:
    """No max_tokens asked: fill the context window (at least 1, at most the server's limit)."""
    return max(1, min(limit, window - prompt_len))


def check_min_tokens(guided: GuidedDecoding | None, min_tokens: int) -> None:
    """A grammar may allow nothing but the end (a complete document, a closed call), which min_tokens
    would forbid: the row could never finish."""
    if guided is not None and min_tokens > 0:
        raise InvalidRequest(
            "min_tokens cannot be combined with structured output (response_format or tools): send it"
            " without min_tokens (the grammar decides where the answer ends)",
            "min_tokens",
        )
