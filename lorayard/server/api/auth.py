"""The API key: checked on every request but the liveness probe, before any body is read.

:class:`ApiKeyGate` is the outermost middleware, so a request without the key gets 401 whatever its
body (huge: not 413; invalid: not 400) and never reaches a parser, a route, ``/openapi.json`` or
``/docs`` (the route table is not public when the API is not). ``require_api_key`` stays on the
routes as the same check in FastAPI's terms (the route table's OpenAPI security and direct app tests).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from lorayard.server.api.errors import APIError, error_response
from lorayard.server.runtime import Runtime

_MESSAGE = "missing or invalid API key (send 'Authorization: Bearer KEY')"

ALWAYS_PUBLIC = frozenset({"/health"})
"""Paths that answer without the key: liveness, which a kubelet probes without credentials."""


def key_matches(authorization: str, expected: str) -> bool:
    """Whether an ``Authorization`` header carries ``expected`` as a Bearer token (constant time)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


def require_api_key(request: Request) -> None:
    """Bearer key check in constant time; a no-op when no key is configured."""
    runtime: Runtime = request.app.state.runtime
    expected = runtime.settings.api_key
    if expected and not key_matches(request.headers.get("authorization", ""), expected):
        raise APIError(401, _MESSAGE, code="invalid_api_key")


class ApiKeyGate:
    """401 for a request without the key, before its body is read (``metrics_public``: /metrics is
    left to its route, which checks the key only when it is not public)."""

    def __init__(self, app: ASGIApp, api_key: str | None, *, metrics_public: bool) -> None:
        self.app = app
        self.api_key = api_key
        self.public = ALWAYS_PUBLIC | ({"/metrics"} if metrics_public else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            not self.api_key
            or scope["type"] != "http"
            or scope["path"] in self.public
            or key_matches(Headers(scope=scope).get("authorization", ""), self.api_key)
        ):
            await self.app(scope, receive, send)
            return
        await error_response(401, _MESSAGE, code="invalid_api_key")(scope, receive, send)


def caller_digest(request: Request) -> str:
    """Who made a request, for scoping what it stores: a digest of the bearer token it presented (the
    token itself is never kept); "" without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ""
    return hashlib.sha256(token.strip().encode()).hexdigest()
