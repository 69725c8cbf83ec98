import asyncio
import json
from collections import Counter

import httpx
import numpy as np
import pytest
from lorayard.client.loadtest import (
    BASE_LABEL,
    LoadTestConfig,
    LoadTester,
    PromptsFileError,
    RequestRecord,
    Workload,
    breakdown,
    load_prompts,
    prompt_from_text,
)
from lorayard.client.plot import plot_loadtest
from pydantic import ValidationError

MODELS = {"object": "list", "data": [{"id": "base-m", "object": "model"}, {"id": "a", "parent": "base-m"}]}


class StandInServer:
    """An async MockTransport handler speaking the OpenAI wire format with a small delay per request.

    Answers with ``len(prompt words)`` output tokens (one SSE delta each) and records which adapter each
    request named; ``fail_every`` answers every n-th generation request with 429.
    """

    def __init__(self, wire, *, delay_s=0.01, fail_every=0):
        self.wire = wire
        self.delay_s = delay_s
        self.fail_every = fail_every
        self.generations = 0
        self.adapters: Counter = Counter()
        self.output_tokens: Counter = Counter()
        self.models: list[str | None] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        body = json.loads(request.content)
        self.generations += 1
        if self.fail_every and self.generations % self.fail_every == 0:
            return httpx.Response(429, json=self.wire.error_body("queue full", "rate_limit_error"))
        await asyncio.sleep(self.delay_s)
        label = body.get("adapter") or BASE_LABEL
        self.models.append(body.get("model"))
        pieces = [f"{word} " for word in body["messages"][-1]["content"].split()][: body["max_tokens"]]
        self.adapters[label] += 1
        self.output_tokens[label] += len(pieces)
        if body.get("stream"):
            return httpx.Response(200, content=self.wire.sse_body(self.wire.chat_chunks(pieces)))
        response = self.wire.chat_response("".join(pieces), completion_tokens=len(pieces))
        return httpx.Response(200, json=response)


def _run(config, server, **kwargs):
    tester = LoadTester(config, transport=httpx.MockTransport(server), **kwargs)
    return asyncio.run(tester.run())


def test_closed_loop_counts_agree_with_the_server(wire, tmp_path):
    server = StandInServer(wire)
    config = LoadTestConfig(
        base_url="http://test/v1",
        adapters=["a", "b"],
        weights=[3, 1],
        concurrency=3,
        requests=16,
        max_tokens=6,
        stream=True,
        seed=1,
    )
    seen = []
    result = _run(config, server, on_record=seen.append)
    assert result.requests == result.completed == 16 and result.errors == {}
    assert result.stopped_by == "requests"
    assert len(seen) == 16
    assert {k: v.requests for k, v in result.per_adapter.items()} == dict(server.adapters)
    assert {k: v.output_tokens for k, v in result.per_adapter.items()} == dict(server.output_tokens)
    assert result.output_tokens == sum(server.output_tokens.values())
    assert result.output_tokens_per_s == pytest.approx(result.output_tokens / result.duration_s)
    assert result.ttft_ms.count == 16 and result.e2e_ms.p50 >= result.ttft_ms.p50 > 0
    assert result.itl_ms.count == result.output_tokens - 16  # gaps between deltas
    assert result.config == config and result.machine["cpu_count"] >= 1
    assert result.server["base_models"] == ["base-m"]

    json.loads(result.model_dump_json())  # what --out writes
    plot = tmp_path / "results.png"
    plot_loadtest(result, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_counted_by_status_and_base_requests_name_the_base(wire):
    server = StandInServer(wire, fail_every=3)
    config = LoadTestConfig(base_url="http://test/v1", concurrency=2, requests=9, max_tokens=4)
    result = _run(config, server)
    assert result.errors == {"429": 3}
    assert result.completed == 6 and result.requests == 9
    assert list(result.per_adapter) == [BASE_LABEL]
    assert result.ttft_ms.count == 0  # not streamed: only end-to-end latency
    assert result.e2e_ms.count == 6
    assert set(server.models) == {"base-m"}  # the base id from /v1/models, as vLLM requires


def test_poisson_arrivals_stop_at_the_duration(wire):
    server = StandInServer(wire)
    config = LoadTestConfig(base_url="http://test/v1", rate=40, duration_s=0.5, max_tokens=4, seed=2)
    result = _run(config, server)
    assert result.stopped_by == "duration"
    assert 5 <= result.requests <= 60  # ~20 expected
    assert result.completed == result.requests
    starts = [s["start_s"] for s in result.samples]
    assert max(starts) < 0.5 + 0.1


def test_hard_cap_cancels_in_flight_requests(wire):
    server = StandInServer(wire, delay_s=30)
    config = LoadTestConfig(
        base_url="http://test/v1", concurrency=2, requests=4, max_tokens=4, max_duration_s=0.3
    )
    result = _run(config, server)
    assert result.stopped_by == "hard_cap"
    assert result.errors == {"cancelled": 2} and result.completed == 0
    assert result.duration_s < 5


def test_workload_is_seeded_and_follows_weights():
    config = LoadTestConfig(
        base_url="x", adapters=["a", "b", None], weights=[3, 1, 0], concurrency=1, requests=1
    )
    prompts = [prompt_from_text(str(i)) for i in range(5)]
    first = Workload(config, prompts)
    second = Workload(config, prompts)
    picks = [first.next() for _ in range(4000)]
    assert picks == [second.next() for _ in range(4000)]
    counts = Counter(adapter for adapter, _ in picks)
    assert counts[None] == 0
    assert counts["a"] / 4000 == pytest.approx(0.75, abs=0.03)


def test_breakdown_math():
    records = [
        RequestRecord(
            index=0,
            adapter="a",
            start_s=0.0,
            e2e_s=1.0,
            ttft_s=0.1,
            itl_s=[0.2, 0.3],
            prompt_tokens=5,
            output_tokens=3,
        ),
        RequestRecord(
            index=1,
            adapter="a",
            start_s=0.5,
            e2e_s=2.0,
            ttft_s=0.4,
            itl_s=[0.5],
            prompt_tokens=6,
            output_tokens=2,
        ),
        RequestRecord(index=2, adapter="a", start_s=0.6, status="503", error="draining"),
    ]
    part = breakdown(records, duration_s=4.0)
    assert (part.requests, part.completed, part.errors) == (3, 2, {"503": 1})
    assert (part.prompt_tokens, part.output_tokens) == (11, 5)
    assert part.requests_per_s == 0.5 and part.output_tokens_per_s == 1.25
    assert part.itl_ms.p50 == pytest.approx(np.percentile([200, 300, 500], 50))
    assert part.e2e_ms.mean == pytest.approx(1500)


def test_prompts_file_formats(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        'Plain line\n\n{"prompt": "From JSON"}\n'
        '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}\n',
        encoding="utf-8",
    )
    prompts = load_prompts(path)
    assert [p.text for p in prompts] == ["Plain line", "From JSON", None]
    assert prompts[2].messages[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('ok\n{"prompt": 3}\n', ":2: a JSON line needs"),
        ("ok\n\n{broken\n", ":3: not valid JSON"),
        ("\n\n", "no prompts"),
    ],
)
def test_prompts_file_errors_name_the_line(tmp_path, content, expected):
    path = tmp_path / "p.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptsFileError, match=expected):
        load_prompts(path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"concurrency": 1, "rate": 2.0, "requests": 1}, "exactly one of --concurrency or --rate"),
        ({"requests": 1}, "exactly one of --concurrency or --rate"),
        ({"concurrency": 1}, "--requests, --duration"),
        ({"concurrency": 1, "requests": 1, "adapters": ["a"], "weights": [1, 2]}, "--weights has 2"),
        ({"concurrency": 0, "requests": 1}, "--concurrency"),
    ],
)
def test_config_errors_name_the_flag(fields, message):
    with pytest.raises(ValidationError, match=message):
        LoadTestConfig(base_url="x", max_tokens=4, **fields)


def test_the_config_prompts_file_is_what_a_load_test_sends(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a long prompt from the file"}\n', encoding="utf-8")
    config = LoadTestConfig(
        base_url="http://127.0.0.1:9/v1",
        concurrency=1,
        requests=1,
        endpoint="completion",
        prompts_file=str(path),
    )
    assert [p.text for p in LoadTester(config).prompts] == ["a long prompt from the file"]
    given = [prompt_from_text("given")]
    assert LoadTester(config, prompts=given).prompts == given  # prompts passed in win
