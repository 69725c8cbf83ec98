import asyncio
import random
import time

import httpx
import pytest
from lorayard.client import (
    APIConnectionError,
    APITimeoutError,
    AsyncLorayardClient,
    BadRequestError,
    LorayardClient,
    NotFoundError,
    RateLimitedError,
    RetryPolicy,
    ServiceUnavailableError,
    UnauthorizedError,
)

MESSAGES = [{"role": "user", "content": "hi"}]


class ScriptedServer:
    """Answers request i with script[i] (a status, headers pair or an exception), then 200."""

    def __init__(self, wire, script):
        self.wire = wire
        self.script = list(script)
        self.calls = 0
        self.times: list[float] = []

    def answer(self, request: httpx.Request) -> httpx.Response:
        self.times.append(time.perf_counter())
        step = self.script[self.calls] if self.calls < len(self.script) else None
        self.calls += 1
        if isinstance(step, Exception):
            raise step
        if step is None:
            return httpx.Response(200, json=self.wire.chat_response("ok"))
        status, headers = step
        body = self.wire.error_body(f"status {status}", "some_type")
        return httpx.Response(status, json=body, headers=headers)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.answer)

    def async_transport(self) -> httpx.MockTransport:
        async def handler(request):
            return self.answer(request)

        return httpx.MockTransport(handler)


def _client(server, **options):
    events = []
    options.setdefault("retry", RetryPolicy(max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.05))
    client = LorayardClient("http://test/v1", transport=server.transport(), on_retry=events.append, **options)
    return client, events


def test_retry_after_is_honoured(wire):
    server = ScriptedServer(wire, [(429, {"Retry-After": "1"}), (503, {"Retry-After": "0.2"})])
    client, events = _client(server)
    assert client.chat(MESSAGES).text == "ok"
    assert server.calls == 3
    assert [e.delay_s for e in events] == [1.0, 0.2]
    assert [type(e.error) for e in events] == [RateLimitedError, ServiceUnavailableError]
    gaps = [b - a for a, b in zip(server.times, server.times[1:], strict=False)]
    assert gaps[0] >= 1.0 and gaps[1] >= 0.2


def test_gives_up_after_max_attempts(wire):
    server = ScriptedServer(wire, [(503, {})] * 10)
    client, events = _client(server, retry=RetryPolicy(max_attempts=3, backoff_base_s=0.01))
    with pytest.raises(ServiceUnavailableError) as caught:
        client.chat(MESSAGES)
    assert server.calls == 3
    assert len(events) == 2
    assert caught.value.status_code == 503


def test_backoff_without_retry_after_grows_with_jitter(wire):
    policy = RetryPolicy(max_attempts=5, backoff_base_s=0.02, backoff_max_s=0.05, jitter=0.5)
    server = ScriptedServer(wire, [(429, {})] * 4)
    client, events = _client(server, retry=policy, seed=3)
    client.chat(MESSAGES)
    delays = [e.delay_s for e in events]
    ceilings = [0.02, 0.04, 0.05, 0.05]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling * 0.5 <= delay <= ceiling


def test_policy_backoff_bounds_and_jitter_spread():
    policy = RetryPolicy(backoff_base_s=0.5, backoff_max_s=8.0, jitter=0.25)
    rng = random.Random(0)
    for retry_index, ceiling in enumerate([0.5, 1.0, 2.0, 4.0, 8.0, 8.0]):
        samples = [policy.backoff_s(retry_index, rng) for _ in range(200)]
        assert all(0.75 * ceiling <= s <= ceiling for s in samples)
        assert max(samples) - min(samples) > 0.1 * ceiling  # really jittered


def test_retry_after_beyond_the_cap_is_not_waited_for(wire):
    server = ScriptedServer(wire, [(429, {"Retry-After": "3600"})])
    client, events = _client(server)
    with pytest.raises(RateLimitedError) as caught:
        client.chat(MESSAGES)
    assert server.calls == 1 and events == []
    assert caught.value.retry_after_s == 3600


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, BadRequestError), (401, UnauthorizedError), (404, NotFoundError)],
)
def test_other_client_errors_are_not_retried(wire, status, error_type):
    server = ScriptedServer(wire, [(status, {"Retry-After": "0"})])
    client, events = _client(server)
    with pytest.raises(error_type):
        client.chat(MESSAGES)
    assert server.calls == 1 and events == []


def test_connection_errors_are_retried(wire):
    server = ScriptedServer(wire, [httpx.ConnectError("refused"), httpx.RemoteProtocolError("reset")])
    client, events = _client(server)
    assert client.chat(MESSAGES).text == "ok"
    assert server.calls == 3
    assert all(isinstance(e.error, APIConnectionError) for e in events)


def test_connection_errors_exhaust_into_api_connection_error(wire):
    server = ScriptedServer(wire, [httpx.ConnectError("refused")] * 5)
    client, _ = _client(server, retry=RetryPolicy(max_attempts=2, backoff_base_s=0.01))
    with pytest.raises(APIConnectionError):
        client.models()
    assert server.calls == 2


def test_timeouts_are_not_retried(wire):
    server = ScriptedServer(wire, [httpx.ReadTimeout("slow")])
    client, events = _client(server)
    with pytest.raises(APITimeoutError):
        client.chat(MESSAGES)
    assert server.calls == 1 and events == []


def test_async_client_retries_the_same_way(wire):
    server = ScriptedServer(wire, [(429, {"Retry-After": "0.1"}), httpx.ConnectError("refused")])
    events = []

    async def run():
        policy = RetryPolicy(max_attempts=3, backoff_base_s=0.01)
        async with AsyncLorayardClient(
            "http://test/v1", transport=server.async_transport(), retry=policy, on_retry=events.append
        ) as client:
            return await client.chat(MESSAGES)

    assert asyncio.run(run()).text == "ok"
    assert server.calls == 3
    assert events[0].delay_s == 0.1 and isinstance(events[1].error, APIConnectionError)


def test_async_client_gives_up(wire):
    server = ScriptedServer(wire, [(503, {"Retry-After": "0"})] * 5)

    async def run():
        policy = RetryPolicy(max_attempts=2)
        async with AsyncLorayardClient(
            "http://test/v1", transport=server.async_transport(), retry=policy
        ) as c:
            await c.chat(MESSAGES)

    with pytest.raises(ServiceUnavailableError):
        asyncio.run(run())
    assert server.calls == 2


def test_stream_open_is_retried(wire):
    body = wire.sse_body(wire.chat_chunks(["x", "y"]))
    calls = []

    def handler(request):
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(
                429, headers={"Retry-After": "0"}, json=wire.error_body("full", "rate_limit")
            )
        return httpx.Response(200, content=body)

    client = LorayardClient("http://test/v1", transport=httpx.MockTransport(handler))
    assert "".join(client.chat_stream(MESSAGES)) == "xy"
    assert len(calls) == 2


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=2)
