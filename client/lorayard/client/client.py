"""The two clients: :class:`LorayardClient` (blocking) and :class:`AsyncLorayardClient` (asyncio).

Both are thin: request building, parsing, retry decisions and error mapping live in
:mod:`client.base`; these classes only perform the I/O and the waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Self, Unpack

import httpx
from lorayard.client.base import (
    BaseClient,
    BaseStream,
    ClientOptions,
    Endpoint,
    Message,
    StreamAccumulator,
    connection_error,
    parse_adapter_operation,
    parse_generation,
    parse_models,
    status_error,
)
from lorayard.client.errors import LorayardError
from lorayard.client.types import AdapterOperationResult, GenerationResult, ModelInfo


class TextStream(BaseStream):
    """An iterator of text deltas; ``usage``/``finish_reason``/``result()`` are set once it is exhausted.

    The request is sent on the first ``next()``; use it as a context manager (or call ``close()``) to
    drop the connection early.
    """

    def __init__(self, open_response: Callable[[], httpx.Response], accumulator: StreamAccumulator) -> None:
        self._open = open_response
        self._acc = accumulator
        self._deltas: Iterator[str] | None = None

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> str:
        if self._deltas is None:
            self._deltas = self._generate()
        return next(self._deltas)

    def _generate(self) -> Iterator[str]:
        self._acc.started_at = time.perf_counter()
        response = self._open()
        try:
            try:
                for chunk in response.iter_bytes():
                    yield from self._acc.feed(chunk)
                    if self._acc.done:
                        break
            except httpx.TransportError as exc:
                raise connection_error(exc) from exc
            yield from self._acc.finish()
        finally:
            response.close()

    def close(self) -> None:
        """Stop reading and release the connection."""
        if self._deltas is not None and hasattr(self._deltas, "close"):
            self._deltas.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncTextStream(BaseStream):
    """The async twin of :class:`TextStream`: ``async for delta in stream``."""

    def __init__(
        self, open_response: Callable[[], Awaitable[httpx.Response]], accumulator: StreamAccumulator
    ) -> None:
        self._open = open_response
        self._acc = accumulator
        self._deltas: AsyncIterator[str] | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        if self._deltas is None:
            self._deltas = self._generate()
        return await anext(self._deltas)

    async def _generate(self) -> AsyncIterator[str]:
        self._acc.started_at = time.perf_counter()
        response = await self._open()
        try:
            try:
                async for chunk in response.aiter_bytes():
                    for delta in self._acc.feed(chunk):
                        yield delta
                    if self._acc.done:
                        break
            except httpx.TransportError as exc:
                raise connection_error(exc) from exc
            for delta in self._acc.finish():
                yield delta
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        """Stop reading and release the connection."""
        if self._deltas is not None and hasattr(self._deltas, "aclose"):
            await self._deltas.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class LorayardClient(BaseClient):
    """Blocking client for a LoRAyard (or any OpenAI-compatible) server.

    >>> client = LorayardClient("http://127.0.0.1:8000/v1", api_key="secret")
    >>> client.chat([{"role": "user", "content": "Hi"}], adapter="support", max_tokens=32).text
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        """``options``: api_key, model, timeout, retry, on_retry, seed, headers (see :class:`BaseClient`)."""
        super().__init__(base_url, **options)
        self._http = http_client or httpx.Client(transport=transport)

    def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send with retries; returns a successful response or raises the mapped error."""
        retries = self._retry_state()
        while True:
            error: LorayardError
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error = connection_error(exc)
            else:
                if response.is_success:
                    return response
                response.read()
                response.close()
                error = status_error(response)
            time.sleep(retries.delay_after(error))

    def _generate(self, endpoint: Endpoint, body: dict[str, Any], adapter: str | None) -> GenerationResult:
        request = self._request(self._http, "POST", self._url(self._endpoint_path(endpoint)), body)
        return parse_generation(self._send(request).json(), endpoint=endpoint, adapter=adapter)

    def _stream(self, endpoint: Endpoint, body: dict[str, Any], adapter: str | None) -> TextStream:
        request = self._request(self._http, "POST", self._url(self._endpoint_path(endpoint)), body)
        return TextStream(
            lambda: self._send(request, stream=True), StreamAccumulator(endpoint=endpoint, adapter=adapter)
        )

    def chat(
        self,
        messages: Sequence[Message],
        *,
        adapter: str | None = None,
        model: str | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        """One chat completion. ``sampling``: max_tokens, temperature, top_p, seed, stop, ignore_eos, ..."""
        body = self._chat_body(messages, adapter=adapter, model=model, stream=False, sampling=sampling)
        return self._generate("chat", body, adapter)

    def complete(
        self, prompt: str, *, adapter: str | None = None, model: str | None = None, **sampling: Any
    ) -> GenerationResult:
        """One text completion of a raw prompt (no chat template)."""
        body = self._completion_body(prompt, adapter=adapter, model=model, stream=False, sampling=sampling)
        return self._generate("completion", body, adapter)

    def chat_stream(
        self,
        messages: Sequence[Message],
        *,
        adapter: str | None = None,
        model: str | None = None,
        **sampling: Any,
    ) -> TextStream:
        """Stream a chat completion: iterate for text deltas; usage is on the stream at the end."""
        body = self._chat_body(messages, adapter=adapter, model=model, stream=True, sampling=sampling)
        return self._stream("chat", body, adapter)

    def complete_stream(
        self, prompt: str, *, adapter: str | None = None, model: str | None = None, **sampling: Any
    ) -> TextStream:
        """Stream a text completion."""
        body = self._completion_body(prompt, adapter=adapter, model=model, stream=True, sampling=sampling)
        return self._stream("completion", body, adapter)

    def models(self) -> list[ModelInfo]:
        """The base model and every adapter the server can serve."""
        return parse_models(self._send(self._request(self._http, "GET", self._url("models"))).json())

    def load_adapter(self, name: str, path: str | None = None) -> AdapterOperationResult:
        """Load (or reload) an adapter; ``path`` must lie inside the server's adapters volume."""
        body = {"lora_name": name, **({"lora_path": path} if path is not None else {})}
        request = self._request(self._http, "POST", self._url("load_lora_adapter"), body)
        return parse_adapter_operation(self._send(request))

    def unload_adapter(self, name: str) -> AdapterOperationResult:
        """Evict an adapter from the server's memory (it stays on the volume)."""
        request = self._request(self._http, "POST", self._url("unload_lora_adapter"), {"lora_name": name})
        return parse_adapter_operation(self._send(request))

    def health(self) -> bool:
        """Liveness: the process answers ``GET /health`` with 200 (no retries)."""
        return self._probe("health")

    def ready(self) -> bool:
        """Readiness: ``GET /ready`` is 200 (model loaded, not draining); False on 503 (no retries)."""
        return self._probe("ready")

    def metrics_text(self) -> str:
        """The server's Prometheus exposition (``GET /metrics``)."""
        return self._send(self._request(self._http, "GET", self._root_url("metrics"))).text

    def _probe(self, path: str) -> bool:
        try:
            response = self._http.send(self._request(self._http, "GET", self._root_url(path)))
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        return response.is_success

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncLorayardClient(BaseClient):
    """The asyncio twin of :class:`LorayardClient`: the same methods, awaited.

    Streams are returned without awaiting and iterated with ``async for``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
        max_connections: int | None = 100,
        **options: Unpack[ClientOptions],
    ) -> None:
        """``max_connections``: pool size (the load tester raises it to its concurrency)."""
        super().__init__(base_url, **options)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = http_client or httpx.AsyncClient(transport=transport, limits=limits)

    async def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send with retries; returns a successful response or raises the mapped error."""
        retries = self._retry_state()
        while True:
            error: LorayardError
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error = connection_error(exc)
            else:
                if response.is_success:
                    return response
                await response.aread()
                await response.aclose()
                error = status_error(response)
            await asyncio.sleep(retries.delay_after(error))

    async def _generate(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: str | None
    ) -> GenerationResult:
        request = self._request(self._http, "POST", self._url(self._endpoint_path(endpoint)), body)
        response = await self._send(request)
        return parse_generation(response.json(), endpoint=endpoint, adapter=adapter)

    def _stream(self, endpoint: Endpoint, body: dict[str, Any], adapter: str | None) -> AsyncTextStream:
        request = self._request(self._http, "POST", self._url(self._endpoint_path(endpoint)), body)
        return AsyncTextStream(
            lambda: self._send(request, stream=True), StreamAccumulator(endpoint=endpoint, adapter=adapter)
        )

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        adapter: str | None = None,
        model: str | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        """One chat completion. ``sampling``: max_tokens, temperature, top_p, seed, stop, ignore_eos, ..."""
        body = self._chat_body(messages, adapter=adapter, model=model, stream=False, sampling=sampling)
        return await self._generate("chat", body, adapter)

    async def complete(
        self, prompt: str, *, adapter: str | None = None, model: str | None = None, **sampling: Any
    ) -> GenerationResult:
        """One text completion of a raw prompt (no chat template)."""
        body = self._completion_body(prompt, adapter=adapter, model=model, stream=False, sampling=sampling)
        return await self._generate("completion", body, adapter)

    def chat_stream(
        self,
        messages: Sequence[Message],
        *,
        adapter: str | None = None,
        model: str | None = None,
        **sampling: Any,
    ) -> AsyncTextStream:
        """Stream a chat completion: ``async for`` text deltas; usage is on the stream at the end."""
        body = self._chat_body(messages, adapter=adapter, model=model, stream=True, sampling=sampling)
        return self._stream("chat", body, adapter)

    def complete_stream(
        self, prompt: str, *, adapter: str | None = None, model: str | None = None, **sampling: Any
    ) -> AsyncTextStream:
        """Stream a text completion."""
        body = self._completion_body(prompt, adapter=adapter, model=model, stream=True, sampling=sampling)
        return self._stream("completion", body, adapter)

    async def models(self) -> list[ModelInfo]:
        """The base model and every adapter the server can serve."""
        response = await self._send(self._request(self._http, "GET", self._url("models")))
        return parse_models(response.json())

    async def load_adapter(self, name: str, path: str | None = None) -> AdapterOperationResult:
        """Load (or reload) an adapter; ``path`` must lie inside the server's adapters volume."""
        body = {"lora_name": name, **({"lora_path": path} if path is not None else {})}
        request = self._request(self._http, "POST", self._url("load_lora_adapter"), body)
        return parse_adapter_operation(await self._send(request))

    async def unload_adapter(self, name: str) -> AdapterOperationResult:
        """Evict an adapter from the server's memory (it stays on the volume)."""
        request = self._request(self._http, "POST", self._url("unload_lora_adapter"), {"lora_name": name})
        return parse_adapter_operation(await self._send(request))

    async def health(self) -> bool:
        """Liveness: ``GET /health`` answers 200 (no retries)."""
        return await self._probe("health")

    async def ready(self) -> bool:
        """Readiness: ``GET /ready`` is 200; False on 503 (no retries)."""
        return await self._probe("ready")

    async def metrics_text(self) -> str:
        """The server's Prometheus exposition (``GET /metrics``)."""
        response = await self._send(self._request(self._http, "GET", self._root_url("metrics")))
        return response.text

    async def _probe(self, path: str) -> bool:
        try:
            response = await self._http.send(self._request(self._http, "GET", self._root_url(path)))
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        return response.is_success

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
