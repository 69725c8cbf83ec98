"""Every error type mapped once to an HTTP status and OpenAI's JSON.

The body is always ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorayard.server.adapters.registry import AdapterLoadError, AdaptersBusy
from lorayard.server.engine.types import EngineStopped, InvalidRequest, PromptTooLong, QueueFull
from lorayard.volume import AdapterNotFound, InvalidAdapterName

RETRY_AFTER_S = 1


class APIError(Exception):
    """An error the API raises itself, with its status and the field it is about."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


class EngineFailed(Exception):
    """The engine failed this one request (its row alone; the batch ran on): answered as a 500."""


class NotReady(APIError):
    def __init__(self, message: str = "the server is loading the base model") -> None:
        super().__init__(503, message, code="not_ready")


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    500: "internal_error",
}

# Each library/engine error type -> (status, code). One table; never matched by message text.
_MAPPED: dict[type[Exception], tuple[int, str]] = {
    InvalidAdapterName: (400, "invalid_adapter_name"),
    AdapterNotFound: (404, "adapter_not_found"),
    AdapterLoadError: (422, "adapter_load_failed"),
    AdaptersBusy: (503, "adapters_busy"),
    PromptTooLong: (400, "context_length_exceeded"),
    InvalidRequest: (400, "invalid_request"),
    EngineFailed: (500, "engine_error"),
    QueueFull: (429, "queue_full"),
    EngineStopped: (503, "draining"),
}


def _body(status: int, message: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "error"), "param": param, "code": code}}


def error_body(exc: Exception) -> dict:
    """OpenAI's error JSON for any exception (a bug's text is not shown to the client)."""
    status, code = status_of(exc)
    known = isinstance(exc, APIError) or any(isinstance(exc, kind) for kind in _MAPPED)
    message = str(exc) if known else "internal server error"
    return _body(status, message, _param_of(exc), code)


def _json_response(status: int, body: dict) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


# The engine names its own fields (lorayard.server.engine.types); the client knows the request's.
_ENGINE_FIELDS = {"prompt_ids": "prompt", "guided": "response_format"}


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return _json_response(status, _body(status, message, param, code))


def status_of(exc: Exception) -> tuple[int, str | None]:
    if isinstance(exc, APIError):
        return exc.status, exc.code
    for kind, (status, code) in _MAPPED.items():
        if isinstance(exc, kind):
            return status, code
    return 500, "internal_error"


def as_api_error(exc: Exception) -> APIError | None:
    """An error this table knows as an :class:`APIError` (so a caller can rename its ``param``);
    None for a bug."""
    if isinstance(exc, APIError):
        return exc
    if not any(isinstance(exc, kind) for kind in _MAPPED):
        return None
    status, code = status_of(exc)
    return APIError(status, str(exc), param=_param_of(exc), code=code)


def _param_of(exc: Exception) -> str | None:
    if isinstance(exc, APIError):
        return exc.param
    if isinstance(exc, InvalidAdapterName | AdapterNotFound | AdapterLoadError):
        return "adapter"
    if isinstance(exc, PromptTooLong):
        return "messages"
    if isinstance(exc, InvalidRequest):
        return _ENGINE_FIELDS.get(exc.param or "", exc.param)
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405):
            # A bare "Not Found" makes OpenAI clients report a missing model; name what is missing.
            route = f"{request.method} {request.url.path}"
            what = "is not served here" if exc.status_code == 404 else "does not take this method"
            message = f"{route} {what}: the routes we serve are listed in docs/api.md"
            return error_response(exc.status_code, message, param="route", code="unknown_route")
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(exc.status_code, message)

    async def _mapped(_: Request, exc: Exception) -> JSONResponse:
        return _json_response(status_of(exc)[0], error_body(exc))

    # Registered per type so Starlette's ExceptionMiddleware answers them; only true bugs go on, to
    # lorayard.server.app.InternalErrors (which logs the traceback, answers JSON 500, keeps the connection).
    kinds: list[type[Exception]] = [APIError, *_MAPPED]
    for kind in kinds:
        app.add_exception_handler(kind, _mapped)
