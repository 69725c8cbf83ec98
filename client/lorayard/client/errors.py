"""Exceptions raised by the LoRAyard client, one type per failure kind.

The tree (catch a branch to handle all of its leaves)::

    LorayardError
    ├── APIStatusError                 the server answered with an error status (or an error event mid-stream)
    │   ├── BadRequestError            400  bad parameters, invalid adapter name, prompt too long
    │   ├── UnauthorizedError          401  missing or wrong API key
    │   ├── NotFoundError              404  unknown adapter or version
    │   ├── PayloadTooLargeError       413  request body over the server's limit
    │   ├── UnprocessableEntityError   422  the adapter's files are broken or for another base model
    │   ├── RateLimitedError           429  the queue is full (retried, honouring Retry-After)
    │   ├── ServiceUnavailableError    503  not ready yet, draining, or every adapter slot busy (retried)
    │   └── ServerError                5xx  anything else the server got wrong
    ├── APIConnectionError             no HTTP answer at all: refused, reset, DNS (retried)
    │   └── APITimeoutError            the request took longer than the client's timeout
    └── StreamParseError               the server sent an event stream we cannot read

Every :class:`APIStatusError` carries the OpenAI-style error body fields the server sent
(``message``, ``type``, ``param``, ``code``) and the HTTP ``status_code``, so callers branch on
types and fields, never on message text.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx


class LorayardError(Exception):
    """Base of every error this client raises."""


class APIStatusError(LorayardError):
    """The server answered with an error: its status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        response: httpx.Response | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(f"{status_code}: {message}")
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.response = response
        self.body = body

    @property
    def retry_after_s(self) -> float | None:
        """The server's Retry-After (seconds), if it sent one."""
        if self.response is None:
            return None
        return parse_retry_after(self.response.headers.get("retry-after"))


class BadRequestError(APIStatusError):
    """400: the request is invalid (parameters, adapter name, prompt length)."""


class UnauthorizedError(APIStatusError):
    """401: missing or wrong API key."""


class NotFoundError(APIStatusError):
    """404: unknown adapter, version or route."""


class PayloadTooLargeError(APIStatusError):
    """413: the request body is larger than the server accepts."""


class UnprocessableEntityError(APIStatusError):
    """422: the server understood the request but cannot serve it (e.g. a broken adapter)."""


class RateLimitedError(APIStatusError):
    """429: the server's queue is full; retry after ``retry_after_s``."""


class ServiceUnavailableError(APIStatusError):
    """503: the server is starting, draining, or out of adapter slots."""


class ServerError(APIStatusError):
    """Any other 5xx."""


class APIConnectionError(LorayardError):
    """No HTTP answer: connection refused or reset, name resolution failed."""


class APITimeoutError(APIConnectionError):
    """No (complete) answer within the client's timeout."""


class StreamParseError(LorayardError):
    """An event in the server's SSE stream is not the JSON we expect."""


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitedError,
    503: ServiceUnavailableError,
}


def error_class_for_status(status_code: int) -> type[APIStatusError]:
    """The exception type for an HTTP error status (the one mapping, used everywhere)."""
    if status_code in _STATUS_ERRORS:
        return _STATUS_ERRORS[status_code]
    if status_code >= 500:
        return ServerError
    return APIStatusError


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds, fractional accepted, or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds)
