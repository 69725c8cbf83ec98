"""Retries against a real server whose queue holds one request: 429 + Retry-After, then success."""

from __future__ import annotations

import asyncio

import pytest
from lorayard.client import AsyncLorayardClient, RateLimitedError, RetryPolicy

QUESTION = [{"role": "user", "content": "Count to twenty."}]
# Long enough that the first request is still running when the others arrive.
LONG = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
CONCURRENT = 4


@pytest.fixture(scope="module")
def tiny_queue_server(random_adapters_dir, tmp_path_factory, server_launcher):
    log = tmp_path_factory.mktemp("queue-server") / "server.log"
    server = server_launcher.start(random_adapters_dir, log, "--max-queue", "1", "--max-batch-size", "1")
    yield server.v1
    server.stop()


async def _burst(base_url: str, policy: RetryPolicy, events: list) -> list:
    async with AsyncLorayardClient(base_url, retry=policy, on_retry=events.append) as client:
        calls = [client.chat(QUESTION, adapter="alpha", **LONG) for _ in range(CONCURRENT)]
        return await asyncio.gather(*calls, return_exceptions=True)


def test_queue_full_is_429_with_retry_after_and_retries_succeed(tiny_queue_server):
    outcomes = asyncio.run(_burst(tiny_queue_server, RetryPolicy(max_attempts=1), []))
    rejected = [o for o in outcomes if isinstance(o, RateLimitedError)]
    assert rejected, f"expected 429s from a queue of one, got {outcomes}"
    assert all(not isinstance(o, Exception) or isinstance(o, RateLimitedError) for o in outcomes)
    assert rejected[0].retry_after_s is not None and rejected[0].message

    events: list = []
    patient = RetryPolicy(max_attempts=30, backoff_base_s=0.2, backoff_max_s=1.0, max_retry_after_s=5.0)
    outcomes = asyncio.run(_burst(tiny_queue_server, patient, events))
    assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    assert all(o.usage.completion_tokens == LONG["max_tokens"] for o in outcomes)
    assert events and all(isinstance(e.error, RateLimitedError) for e in events)
    assert all(e.delay_s == e.error.retry_after_s for e in events)  # the server's Retry-After, honoured
