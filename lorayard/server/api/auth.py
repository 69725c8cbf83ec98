"""The API key check every authorized route depends on."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from lorayard.server.api.errors import APIError
from lorayard.server.runtime import Runtime


def require_api_key(request: Request) -> None:
    """Bearer key check in constant time; a no-op when no key is configured."""
    runtime: Runtime = request.app.state.runtime
    expected = runtime.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(
            401, "missing or invalid API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"
        )


def caller_digest(request: Request) -> str:
    """Who made a request, for scoping what it stores: a digest of the bearer token it presented (the
    token itself is never kept); "" without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ""
    return hashlib.sha256(token.strip().encode()).hexdigest()
