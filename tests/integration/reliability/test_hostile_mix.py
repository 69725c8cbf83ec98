"""Random mixes of hostile and innocent requests, at once, on one tiny-base server (issue 23's fuzz).

A seeded generator (bounded: one round per hostile adapter builder, HOSTILE_PER_ROUND hostile
requests beside every innocent one) draws hostile requests from :data:`HOSTILE` (each of issue 23's
bad inputs, abandoned requests, huge schemas, malformed bodies) and hostile adapter folders from
:data:`HOSTILE_ADAPTER_BUILDERS`, and asserts, every round:

- no 5xx, and every request answered within REQUEST_BOUND_S (no hang);
- the innocent requests (greedy) answer exactly what they answer alone;
- /health answers within HEALTH_BOUND_S throughout (polled by its own thread).

The seam for hostile adapter folders: :data:`HOSTILE_ADAPTER_BUILDERS` (every kind of
``lorayard.testing.hostile_adapter`` plus a few of our own); each round writes one into the volume
under a fresh name and sends a request for it beside the innocent ones.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from lorayard.testing.hostile_adapter import HOSTILE as HOSTILE_ADAPTER_KINDS
from lorayard.testing.hostile_adapter import build_hostile_adapter
from lorayard.volume import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

from .conftest import copy_folder, small_server
from .test_hostile_requests import JSON, PERSON, _nested, _schema_body, huge_enum

SEED = 23
HOSTILE_PER_ROUND = 5
REQUEST_BOUND_S = 60.0
HEALTH_BOUND_S = 5.0

INNOCENT: list[tuple[str, dict]] = [
    (
        "/v1/completions",
        {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True},
    ),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "adapter": "ok"}),
    ("/v1/completions", {**_schema_body(PERSON), "prompt": "A record:"}),
    (
        "/v1/completions",
        {"prompt": "Score me", "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0},
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0, "seed": 5},
    ),
]
"""Greedy (or seeded) requests whose answers must not change beside anything."""

Hostile = Callable[[random.Random], tuple[str, str | bytes, float | None]]
"""rng -> (path, raw body, client timeout: None waits for the answer, a number abandons it)."""


def _raw(path: str, body: dict, abandon_after: float | None = None) -> Hostile:
    return lambda _rng: (path, json.dumps(body), abandon_after)


def _text(path: str, text: str) -> Hostile:
    return lambda _rng: (path, text, None)


HOSTILE: list[Hostile] = [
    _raw("/v1/completions", _schema_body(_nested(100))),
    _text("/v1/completions", '{"prompt": "a \\ud800 b", "max_tokens": 2}'),
    _text("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    _text("/tokenize", '{"prompt": "\\ud800"}'),
    _raw("/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 1e-40}),
    _raw("/v1/completions", {"prompt": "hi", "max_tokens": 4, "seed": 2**64}),
    _raw("/v1/completions", {"prompt": "hi", "max_tokens": 4, "seed": 2**64 - 1, "n": 2}),
    _text("/v1/load_lora_adapter", '{"lora_name": "x", "lora_path": "/a\\u0000b"}'),
    _raw("/v1/completions", _schema_body({"type": "number", "multipleOf": 0.1})),
    _raw("/v1/completions", _schema_body({"type": "array", "contains": {"const": 1}, "minContains": 2})),
    _raw("/v1/completions", _schema_body({"$ref": "https://example.com/s.json"})),
    _raw(
        "/v1/completions", _schema_body({"type": "object", "patternProperties": {"^a": {"type": "integer"}}})
    ),
    lambda rng: ("/v1/completions", json.dumps(_schema_body(huge_enum(30_000, rng.randrange(10**6)))), None),
    lambda rng: ("/v1/completions", json.dumps(_schema_body(huge_enum(4_000, rng.randrange(10**6)))), 0.2),
    _raw("/v1/completions", {"prompt": "x" * 400, "max_tokens": 64}),
    _raw("/v1/completions", {"prompt": [49152, -1], "max_tokens": 2}),
    _raw("/v1/completions", {"prompt": "hi", "logit_bias": {"1": 1e9}}),
    _raw("/v1/completions", {"prompt": "hi", "adapter": "../../etc"}),
    _raw("/v1/completions", {"prompt": "long", "max_tokens": 64, "ignore_eos": True, "stream": True}, 0.3),
    _text("/v1/completions", '{"prompt": "unterminated'),
    _text("/v1/chat/completions", "[]"),
    lambda _rng: ("/v1/completions", b"\xff\xfe" * 100, None),
]


def _invalid_config(folder: Path, good: Path, _base: Path) -> None:
    copy_folder(good, folder)
    (folder / ADAPTER_CONFIG_FILE).write_text("{ not json")


def _missing_weights(folder: Path, good: Path, _base: Path) -> None:
    copy_folder(good, folder)
    (folder / ADAPTER_WEIGHTS_FILE).unlink()


def _truncated_weights(folder: Path, good: Path, _base: Path) -> None:
    copy_folder(good, folder)
    weights = folder / ADAPTER_WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])


def _from_testing(kind: str) -> Callable[[Path, Path, Path], None]:
    """lorayard.testing.hostile_adapter's ``kind`` (issue 23 items 1, 2, 9: catastrophic patterns,
    non-finite scaling, rank 0, symlinks out of the volume) as a builder here."""

    def build(folder: Path, _good: Path, base: Path) -> None:
        build_hostile_adapter(kind, base, folder)

    build.__name__ = kind
    return build


HOSTILE_ADAPTER_BUILDERS: list[Callable[[Path, Path, Path], None]] = [
    _invalid_config,
    _missing_weights,
    _truncated_weights,
    *(_from_testing(kind) for kind in sorted(HOSTILE_ADAPTER_KINDS)),
]
"""Builders of hostile plain adapter folders: ``builder(folder, good_adapter, base_dir)`` writes one
at ``folder`` (inside the volume). Each round uses the next one (in a seeded order): add a kind to
lorayard.testing.hostile_adapter and it is fuzzed here too."""


@pytest.fixture(scope="module")
def mix_server(tiny_base_dir, tmp_path_factory, tiny_adapter_source):
    root = tmp_path_factory.mktemp("mix")
    server = small_server(
        tiny_base_dir, root, tiny_adapter_source, "--poll-interval", "0.2", "--max-body-bytes", str(1 << 20)
    )
    server.volume = root / "adapters"  # type: ignore[attr-defined]
    server.base_dir = tiny_base_dir  # type: ignore[attr-defined]
    yield server
    server.stop()


LOGPROB_TOLERANCE = 1e-3
"""Logprobs of a batched row differ from the same row alone in float32 rounding (another batch
shape): compared within this; texts and tokens exactly."""


def _answer(response: httpx.Response) -> list[tuple]:
    """What must not change: each choice's text, finish reason and logprob tokens (ids and timings
    differ per request), and its logprob values (compared by :func:`_same`)."""
    answer = []
    for choice in response.json()["choices"]:
        text = choice.get("text") or choice.get("message", {}).get("content")
        logprobs = choice.get("logprobs") or {}
        answer.append((text, choice["finish_reason"], logprobs.get("tokens"), logprobs.get("token_logprobs")))
    return answer


def _same(got: list[tuple], expected: list[tuple]) -> bool:
    if [a[:3] for a in got] != [e[:3] for e in expected]:
        return False
    for (*_, got_values), (*_, expected_values) in zip(got, expected, strict=True):
        pairs = zip(got_values or [], expected_values or [], strict=True)
        if any(
            (a is None) != (b is None) or (a is not None and abs(a - b) > LOGPROB_TOLERANCE) for a, b in pairs
        ):
            return False
    return True


def _post(base_url: str, path: str, content: str | bytes, timeout: float | None) -> tuple[int | None, float]:
    """(status or None when this client abandoned it, seconds)."""
    started = time.monotonic()
    try:
        response = httpx.post(
            base_url + path, content=content, headers=JSON, timeout=timeout or REQUEST_BOUND_S
        )
    except httpx.TimeoutException:
        if timeout is None:
            raise
        return None, time.monotonic() - started
    return response.status_code, time.monotonic() - started


class HealthWatch(threading.Thread):
    """Polls /health until stopped; keeps the slowest answer (a failure counts as infinitely slow)."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.slowest = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            started = time.monotonic()
            try:
                ok = httpx.get(self.base_url + "/health", timeout=HEALTH_BOUND_S * 2).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.slowest = max(self.slowest, time.monotonic() - started if ok else float("inf"))
            time.sleep(0.1)


def test_random_hostile_mixes_hurt_no_innocent_request(mix_server):
    url = mix_server.base_url
    alone = []
    for path, body in INNOCENT:
        response = httpx.post(url + path, json=body, timeout=REQUEST_BOUND_S)
        assert response.status_code == 200, (path, response.text)
        alone.append(_answer(response))
    rng = random.Random(SEED)
    health = HealthWatch(url)
    health.start()
    try:
        builders = rng.sample(HOSTILE_ADAPTER_BUILDERS, len(HOSTILE_ADAPTER_BUILDERS))
        for round_index, build in enumerate(builders):  # one round per hostile adapter folder
            hostile = [rng.choice(HOSTILE)(rng) for _ in range(HOSTILE_PER_ROUND)]
            name = f"hostile-{round_index}"
            build(mix_server.volume / name, mix_server.volume / "ok", mix_server.base_dir)
            hostile.append(
                ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2, "adapter": name}), None)
            )
            order = list(range(len(hostile) + len(INNOCENT)))
            rng.shuffle(order)
            with ThreadPoolExecutor(max_workers=len(order)) as pool:
                hostile_futures = {i: pool.submit(_post, url, *hostile[i]) for i in order if i < len(hostile)}
                innocent_futures = [
                    pool.submit(httpx.post, url + path, json=body, timeout=REQUEST_BOUND_S)
                    for path, body in INNOCENT
                ]
                for i, future in hostile_futures.items():
                    status, seconds = future.result()
                    assert status is None or status < 500, (
                        round_index,
                        build.__name__,
                        hostile[i][0],
                        str(hostile[i][1])[:200],
                        status,
                    )
                    assert seconds < REQUEST_BOUND_S
                for (path, _body), expected, future in zip(INNOCENT, alone, innocent_futures, strict=True):
                    response = future.result()
                    assert response.status_code == 200, (round_index, path, response.text)
                    assert _same(_answer(response), expected), (
                        round_index,
                        path,
                        _answer(response),
                        expected,
                    )
            shutil.rmtree(mix_server.volume / name)
            assert health.slowest < HEALTH_BOUND_S, (round_index, health.slowest)
    finally:
        health.done.set()
        health.join(10)
    assert mix_server.process.poll() is None, "the server died"
    log = mix_server.log()
    assert " 500 " not in log and "Traceback" not in log, log[-4000:]
