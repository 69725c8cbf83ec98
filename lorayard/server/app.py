"""create_app(settings): the FastAPI app, its middleware and lifespan. No globals at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorayard.server.api.auth import ApiKeyGate
from lorayard.server.api.errors import error_response, install_error_handlers
from lorayard.server.api.response_store import ResponseStore
from lorayard.server.api.routes import router
from lorayard.server.metrics import COUNTED_PATHS, UNRESOLVED_LABEL, ServerMetrics
from lorayard.server.runtime import Runtime
from lorayard.server.settings import Settings

UNRESOLVED_LABELS = {"adapter": UNRESOLVED_LABEL, "version": UNRESOLVED_LABEL}
"""Labels of a request refused before it was resolved (a bad body): never what the client sent."""

log = logging.getLogger("lorayard.access")


class BodySizeLimit:
    """Refuse bodies over the limit with 413 before anything parses them (Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = error_response(413, f"request body larger than {self.limit} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(scope, receive, send)
            return
        # Read the (bounded) body up front, then replay it to the app.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class InternalErrors:
    """Any exception no handler answered becomes OpenAI's JSON 500 here, inside the access log.

    Starlette's own last resort (ServerErrorMiddleware) sits outside every middleware and re-raises
    after answering: the access log saw no status (logged 0, never counted) and uvicorn dropped the
    keep-alive connection without ``Connection: close``, so the client's next request on it failed.
    Answered here, the connection stays usable. A response already started cannot be replaced: then
    the error goes on to uvicorn, which closes the connection (the client sees a cut body, not a
    complete wrong one).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            if started:
                raise
            log.exception("%s %s: unhandled error", scope["method"], scope["path"])
            await error_response(500, "internal server error", code="internal_error")(scope, receive, send)


class AccessLog:
    """One line per request: method, path, adapter, status, tokens, duration. Never the API key.

    Also counts every answered generation request by HTTP status (``lorayard_requests_total``): here,
    because refusals (4xx from validation, 404, 429) never reach the generation code.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            state = scope.get("state", {})
            generation = state.get("generation")
            usage = generation.usage if generation is not None else None
            tokens = f" prompt={usage.prompt_tokens} output={usage.completion_tokens}" if usage else ""
            adapter = f" adapter={generation.adapter_label}" if generation is not None else ""
            if scope["path"] in COUNTED_PATHS and status:
                # A stream's status is sent before it runs; if it failed later, count its error's.
                final = (state.get("stream_errors") or [status])[0]
                labels = generation.labels if generation is not None else UNRESOLVED_LABELS
                self.metrics.requests.labels(**labels, status=str(final)).inc()
            log.info(
                "%s %s %s%s%s %.1fms",
                scope["method"],
                scope["path"],
                status,
                adapter,
                tokens,
                (time.perf_counter() - started) * 1000,
            )


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    runtime = runtime or Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(runtime.load())
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await runtime.close()

    app = FastAPI(title="LoRAyard", version="0.1.0", lifespan=lifespan)
    app.state.runtime = runtime
    app.state.responses = ResponseStore(settings.responses_store_size, settings.responses_store_ttl)
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(InternalErrors)  # innermost of ours: the access log sees its 500
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    # After (so around) the body limit: a request without the key is 401 before its body is read.
    app.add_middleware(ApiKeyGate, api_key=settings.api_key, metrics_public=settings.metrics_public)
    app.add_middleware(AccessLog, metrics=runtime.metrics)
    return app
