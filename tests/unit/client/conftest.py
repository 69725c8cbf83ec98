"""Stand-in server responses for unit tests: httpx.MockTransport plays the HTTP server, as in httpx's own
tests, so the retry/backoff, error-mapping and streaming logic run over real httpx request/response
objects without a network."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest


class Wire:
    """Builders for OpenAI wire-format bodies."""

    @staticmethod
    def sse_body(chunks: Iterable[dict], *, done: bool = True) -> bytes:
        """An OpenAI-style SSE body: one ``data:`` event per chunk, then ``[DONE]``."""
        text = "".join(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n" for chunk in chunks)
        if done:
            text += "data: [DONE]\n\n"
        return text.encode("utf-8")

    @staticmethod
    def chat_chunks(pieces: list[str], *, finish_reason: str = "stop", prompt_tokens: int = 7) -> list[dict]:
        """Chat completion chunks with one content delta per piece, a finish chunk and a usage chunk."""
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m"}
        chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        chunks += [{**base, "choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
        chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        chunks.append({**base, "choices": [], "usage": usage})
        return chunks

    @staticmethod
    def chat_response(text: str, *, model: str = "m", completion_tokens: int = 3) -> dict:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": completion_tokens,
                "total_tokens": 5 + completion_tokens,
            },
        }

    @staticmethod
    def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
        return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@pytest.fixture
def wire() -> type[Wire]:
    return Wire
