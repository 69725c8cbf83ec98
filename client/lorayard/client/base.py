"""Everything the sync and async clients share: configuration, request building, response parsing,
the retry policy, error mapping and stream accumulation. The two clients in :mod:`lorayard.client.client` only
add the I/O (``send`` vs ``await send``, ``time.sleep`` vs ``asyncio.sleep``).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import httpx
from lorayard.client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    LorayardError,
    StreamParseError,
    error_class_for_status,
)
from lorayard.client.sse import ServerSentEvent, SSEDecoder
from lorayard.client.types import AdapterOperationResult, GenerationResult, ModelInfo, Usage

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
ENV_BASE_URL = "LORAYARD_BASE_URL"
ENV_API_KEY = "LORAYARD_API_KEY"
DEFAULT_TIMEOUT_S = 300.0
"""Per-request budget (the read timeout between bytes); a queued request on a busy CPU server waits long."""
DEFAULT_CONNECT_TIMEOUT_S = 10.0

Endpoint = Literal["chat", "completion"]
Message = Mapping[str, Any]


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying a request again.

    Retried: the statuses in ``retry_statuses`` (429 queue full, 503 not ready / draining) and
    connection failures. Never retried: other 4xx (the request itself is wrong), other 5xx, timeouts
    (the server may still be generating; a retry would double the load).
    """

    max_attempts: int = 4
    """Total attempts including the first; 1 disables retries."""
    backoff_base_s: float = 0.5
    """Wait before the first retry when the server sends no Retry-After; doubles per retry."""
    backoff_max_s: float = 8.0
    """Cap on one backoff wait."""
    jitter: float = 0.25
    """Up to this fraction of each backoff is random, so many clients do not retry in lockstep."""
    max_retry_after_s: float = 60.0
    """A Retry-After longer than this is not waited for: the error is raised instead."""
    retry_statuses: frozenset[int] = frozenset({429, 503})
    retry_connection_errors: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")

    def is_retryable(self, error: LorayardError) -> bool:
        """Whether this kind of failure may succeed on a later attempt."""
        if isinstance(error, APIStatusError):
            return error.status_code in self.retry_statuses
        if isinstance(error, APITimeoutError):
            return False
        return isinstance(error, APIConnectionError) and self.retry_connection_errors

    def backoff_s(self, retry_index: int, rng: random.Random) -> float:
        """Exponential backoff with jitter for the ``retry_index``-th retry (0-based)."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0**retry_index)
        return ceiling * (1.0 - self.jitter * rng.random())

    def delay_s(self, retry_index: int, error: LorayardError, rng: random.Random) -> float | None:
        """Seconds to wait before retrying after ``error``; None means give up and raise it."""
        if retry_index + 1 >= self.max_attempts or not self.is_retryable(error):
            return None
        retry_after = error.retry_after_s if isinstance(error, APIStatusError) else None
        if retry_after is None:
            return self.backoff_s(retry_index, rng)
        if retry_after > self.max_retry_after_s:
            return None
        return retry_after


@dataclass(frozen=True)
class RetryEvent:
    """Reported to ``on_retry`` before each wait: which attempt failed, why, and the wait."""

    attempt: int
    """1-based number of the attempt that failed."""
    error: LorayardError
    delay_s: float


RetryCallback = Callable[[RetryEvent], None]


class ClientOptions(TypedDict, total=False):
    """Keyword options both clients accept (see :meth:`BaseClient.__init__`)."""

    api_key: str | None
    model: str | None
    timeout: float | httpx.Timeout
    retry: RetryPolicy | None
    on_retry: RetryCallback | None
    seed: int | None
    headers: Mapping[str, str] | None


@dataclass
class RetryState:
    """Counts the attempts of one request against its policy."""

    policy: RetryPolicy
    rng: random.Random
    on_retry: RetryCallback | None = None
    failures: int = 0

    def delay_after(self, error: LorayardError) -> float:
        """The wait before the next attempt; raises ``error`` when the policy says stop."""
        delay = self.policy.delay_s(self.failures, error, self.rng)
        self.failures += 1
        if delay is None:
            raise error
        if self.on_retry is not None:
            self.on_retry(RetryEvent(attempt=self.failures, error=error, delay_s=delay))
        return delay


# ---------------------------------------------------------------------------------------------------
# Error mapping


def status_error(response: httpx.Response) -> APIStatusError:
    """The typed exception for an error response (its body must already be read)."""
    body: Any
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = response.text
    fields = _error_fields(body)
    message = fields.get("message") or response.reason_phrase or f"HTTP {response.status_code}"
    return error_class_for_status(response.status_code)(
        str(message),
        status_code=response.status_code,
        type=fields.get("type"),
        param=fields.get("param"),
        code=fields.get("code"),
        response=response,
        body=body,
    )


def _error_fields(body: Any) -> dict[str, Any]:
    """OpenAI ``{"error": {...}}``, FastAPI ``{"detail": ...}``, or plain text."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return error
        if isinstance(error, str):
            return {"message": error}
        if "detail" in body:
            detail = body["detail"]
            return {"message": detail if isinstance(detail, str) else json.dumps(detail)}
        if "message" in body:
            return body
    if isinstance(body, str) and body.strip():
        return {"message": body.strip()}
    return {}


def stream_error(payload: Mapping[str, Any]) -> APIStatusError:
    """An error event sent mid-stream (after the 200 headers): typed by its ``code`` if it is a status."""
    fields = _error_fields(dict(payload))
    code = fields.get("code")
    status = int(code) if isinstance(code, int) or (isinstance(code, str) and code.isdigit()) else 500
    return error_class_for_status(status)(
        str(fields.get("message") or "error in stream"),
        status_code=status,
        type=fields.get("type"),
        param=fields.get("param"),
        code=code,
        body=dict(payload),
    )


def connection_error(exc: httpx.TransportError) -> APIConnectionError:
    """Map an httpx transport failure to our type (timeouts are their own kind)."""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out ({type(exc).__name__}): {exc}")
    return APIConnectionError(f"cannot reach the server ({type(exc).__name__}): {exc}")


# ---------------------------------------------------------------------------------------------------
# Response parsing


def parse_generation(body: Mapping[str, Any], *, endpoint: Endpoint, adapter: str | None) -> GenerationResult:
    """The first choice of a (non-streamed) chat or text completion response."""
    choices = body.get("choices") or []
    if not choices:
        raise StreamParseError(f"response has no choices: {json.dumps(body)[:200]}")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") if endpoint == "chat" else choice.get("text")
    usage = body.get("usage")
    return GenerationResult(
        text=text or "",
        finish_reason=choice.get("finish_reason"),
        usage=Usage.model_validate(usage) if usage else None,
        model=body.get("model"),
        adapter=adapter,
        id=body.get("id"),
    )


def parse_models(body: Mapping[str, Any]) -> list[ModelInfo]:
    """``GET /v1/models`` -> its entries."""
    return [ModelInfo.model_validate(entry) for entry in body.get("data") or []]


def parse_adapter_operation(response: httpx.Response) -> AdapterOperationResult:
    """vLLM answers load/unload with plain text, other servers with JSON: accept both."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return AdapterOperationResult(message=response.text.strip() or None)
    if isinstance(body, dict):
        message = body.get("message")
        return AdapterOperationResult(message=message if isinstance(message, str) else None, fields=body)
    return AdapterOperationResult(message=str(body))


# ---------------------------------------------------------------------------------------------------
# Streaming


@dataclass
class StreamAccumulator:
    """Turns a completion stream's SSE bytes into text deltas and remembers everything else.

    Timestamps are ``time.perf_counter()`` values: ``started_at`` when the request was sent,
    ``delta_times`` when each non-empty text delta arrived (the load tester's TTFT and ITL).
    """

    endpoint: Endpoint
    adapter: str | None
    decoder: SSEDecoder = field(default_factory=SSEDecoder)
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    id: str | None = None
    done: bool = False
    started_at: float | None = None
    delta_times: list[float] = field(default_factory=list)

    def feed(self, chunk: bytes) -> list[str]:
        """Consume a network chunk; return the text deltas it completes."""
        return self._consume(self.decoder.feed(chunk))

    def finish(self) -> list[str]:
        """End of the byte stream: flush an unterminated last event."""
        deltas = self._consume(self.decoder.flush())
        self.done = True
        return deltas

    def _consume(self, events: list[ServerSentEvent]) -> list[str]:
        deltas: list[str] = []
        for event in events:
            if self.done:
                break
            delta = self._handle(event)
            if delta:
                self.delta_times.append(time.perf_counter())
                self.parts.append(delta)
                deltas.append(delta)
        return deltas

    def _handle(self, event: ServerSentEvent) -> str | None:
        if event.data.strip() == "[DONE]":
            self.done = True
            return None
        if not event.data.strip():
            return None
        try:
            payload = json.loads(event.data)
        except json.JSONDecodeError as exc:
            raise StreamParseError(f"stream event is not JSON: {event.data[:200]!r}") from exc
        if not isinstance(payload, dict):
            raise StreamParseError(f"stream event is not a JSON object: {event.data[:200]!r}")
        if "error" in payload:
            raise stream_error(payload)
        self.model = payload.get("model") or self.model
        self.id = payload.get("id") or self.id
        if payload.get("usage"):
            self.usage = Usage.model_validate(payload["usage"])
        delta_text: list[str] = []
        for choice in payload.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            if self.endpoint == "chat":
                piece = (choice.get("delta") or {}).get("content")
            else:
                piece = choice.get("text")
            if piece:
                delta_text.append(piece)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return "".join(delta_text) or None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def result(self) -> GenerationResult:
        """Everything received so far as a :class:`GenerationResult`."""
        return GenerationResult(
            text=self.text,
            finish_reason=self.finish_reason,
            usage=self.usage,
            model=self.model,
            adapter=self.adapter,
            id=self.id,
        )


class BaseStream:
    """What both stream types expose once (or while) they are consumed."""

    _acc: StreamAccumulator

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._acc.text

    @property
    def usage(self) -> Usage | None:
        """Token counts; set by the last chunk (``stream_options.include_usage``)."""
        return self._acc.usage

    @property
    def finish_reason(self) -> str | None:
        return self._acc.finish_reason

    @property
    def started_at(self) -> float | None:
        """``perf_counter()`` when the request was sent (its first attempt)."""
        return self._acc.started_at

    @property
    def delta_times(self) -> list[float]:
        """``perf_counter()`` at each text delta."""
        return self._acc.delta_times

    def result(self) -> GenerationResult:
        """The whole generation; call after the iteration ended."""
        return self._acc.result()


# ---------------------------------------------------------------------------------------------------
# The shared client core


def server_root(base_url: str) -> str:
    """``http://host:port/v1`` -> ``http://host:port`` (health, ready and metrics live at the root)."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


class BaseClient:
    """Configuration and request building shared by :class:`LorayardClient` and its async twin."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        on_retry: RetryCallback | None = None,
        seed: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """``base_url`` ends in ``/v1`` (default ``$LORAYARD_BASE_URL``); ``api_key`` defaults to
        ``$LORAYARD_API_KEY``; ``seed`` makes backoff jitter reproducible."""
        self.base_url = (base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(ENV_API_KEY)
        self.model = model
        """Sent as ``model`` when a call names neither a model nor an adapter; None omits the field."""
        self.timeout = (
            timeout
            if isinstance(timeout, httpx.Timeout)
            else httpx.Timeout(timeout, connect=min(timeout, DEFAULT_CONNECT_TIMEOUT_S))
        )
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self._rng = random.Random(seed)
        self._headers = {"user-agent": "lorayard-client", **(headers or {})}
        if self.api_key:
            self._headers["authorization"] = f"Bearer {self.api_key}"

    def _retry_state(self) -> RetryState:
        return RetryState(policy=self.retry, rng=self._rng, on_retry=self.on_retry)

    def _url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def _root_url(self, path: str) -> str:
        return f"{server_root(self.base_url)}/{path.lstrip('/')}"

    def _model_fields(self, adapter: str | None, model: str | None) -> dict[str, Any]:
        # `model` naming the adapter is what plain OpenAI-compatible servers (vLLM) understand; the
        # extra `adapter` field is LoRAyard's explicit form (and may pin a version: name@v3).
        fields: dict[str, Any] = {}
        chosen = model or adapter or self.model
        if chosen is not None:
            fields["model"] = chosen
        if adapter is not None:
            fields["adapter"] = adapter
        return fields

    def _chat_body(
        self,
        messages: Sequence[Message],
        *,
        adapter: str | None,
        model: str | None,
        stream: bool,
        sampling: Mapping[str, Any],
    ) -> dict[str, Any]:
        body: dict[str, Any] = {**self._model_fields(adapter, model), "messages": [dict(m) for m in messages]}
        return self._finish_body(body, stream=stream, sampling=sampling)

    def _completion_body(
        self,
        prompt: str,
        *,
        adapter: str | None,
        model: str | None,
        stream: bool,
        sampling: Mapping[str, Any],
    ) -> dict[str, Any]:
        body: dict[str, Any] = {**self._model_fields(adapter, model), "prompt": prompt}
        return self._finish_body(body, stream=stream, sampling=sampling)

    @staticmethod
    def _finish_body(body: dict[str, Any], *, stream: bool, sampling: Mapping[str, Any]) -> dict[str, Any]:
        body.update({key: value for key, value in sampling.items() if value is not None})
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _request(
        self,
        http: httpx.Client | httpx.AsyncClient,
        method: str,
        url: str,
        body: Mapping[str, Any] | None = None,
    ) -> httpx.Request:
        # Headers and timeout per request, so a caller-supplied httpx client works unchanged.
        return http.build_request(
            method,
            url,
            json=dict(body) if body is not None else None,
            headers=self._headers,
            timeout=self.timeout,
        )

    @staticmethod
    def _endpoint_path(endpoint: Endpoint) -> str:
        return "chat/completions" if endpoint == "chat" else "completions"
