"""LoRAyard client: typed sync/async clients, a chat/models CLI and a load tester.

It speaks the plain OpenAI wire format (plus the optional ``adapter`` body field), so it works
against LoRAyard, vLLM or any OpenAI-compatible server.
"""

from lorayard.client.base import RetryEvent, RetryPolicy
from lorayard.client.client import AsyncLorayardClient, AsyncTextStream, LorayardClient, TextStream
from lorayard.client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BadRequestError,
    LorayardError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    ServerError,
    ServiceUnavailableError,
    StreamParseError,
    UnauthorizedError,
    UnprocessableEntityError,
)
from lorayard.client.types import AdapterOperationResult, GenerationResult, ModelInfo, Usage

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AdapterOperationResult",
    "AsyncLorayardClient",
    "AsyncTextStream",
    "BadRequestError",
    "GenerationResult",
    "LorayardClient",
    "LorayardError",
    "ModelInfo",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "RetryEvent",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailableError",
    "StreamParseError",
    "TextStream",
    "UnauthorizedError",
    "UnprocessableEntityError",
    "Usage",
]
