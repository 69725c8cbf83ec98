"""Load generator: many concurrent requests over several adapters, latency and throughput report.

Two arrival modes, like vLLM's ``benchmark_serving``: a closed loop of ``concurrency`` workers, each
sending its next request when the previous one finished, or an open loop with Poisson arrivals at
``rate`` requests/s. A run ends after ``requests`` requests or ``duration_s`` seconds (whichever is
given), and never outlives ``max_duration_s`` (in-flight requests are then cancelled).

Token counts come from the server's ``usage`` (``stream_options.include_usage`` when streaming), not
from a client-side tokenizer, so they are the server's own numbers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from lorayard.client.base import DEFAULT_TIMEOUT_S, RetryPolicy
from lorayard.client.client import AsyncLorayardClient
from lorayard.client.errors import APIConnectionError, APIStatusError, APITimeoutError, LorayardError
from lorayard.client.stats import LatencyStats
from pydantic import BaseModel, Field, model_validator

BASE_LABEL = "base"
"""How requests without an adapter are labelled in the report (the server's metrics use the same)."""

DEFAULT_PROMPTS: tuple[str, ...] = (
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a lighthouse in winter.",
    "List three tips for writing clear commit messages.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "Give me a short recipe for pancakes.",
    "Translate 'Where is the train station?' into French and Spanish.",
    "Why do cats purr? Answer briefly.",
    "Write a polite email declining a meeting invitation.",
    "What are the main causes of inflation?",
    "Describe the water cycle for a ten-year-old.",
    "Suggest a name for a coffee shop run by robots, and explain it.",
)
"""Used when no --prompts file is given: short and varied, so prompt lengths differ a little."""

DEFAULT_HARD_CAP_S = 600.0
"""Hard wall-clock cap of a run bounded only by --requests."""
DURATION_GRACE_S = 60.0
"""With --duration D the hard cap defaults to D plus this, so in-flight requests may finish."""


class PromptsFileError(ValueError):
    """A --prompts file line is not a prompt we can send; the message names file:line."""


@dataclass(frozen=True)
class Prompt:
    """One workload item: chat messages (always set) and the raw text for the completions endpoint."""

    messages: tuple[dict[str, Any], ...]
    text: str | None = None


def prompt_from_text(text: str) -> Prompt:
    return Prompt(messages=({"role": "user", "content": text},), text=text)


def load_prompts(path: Path) -> list[Prompt]:
    """One prompt per line: plain text, or JSON objects with ``prompt`` (text) or ``messages`` (chat)."""
    prompts: list[Prompt] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("{"):
            prompts.append(prompt_from_text(line))
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptsFileError(f"{where}: not valid JSON ({exc.msg})") from exc
        if isinstance(item.get("prompt"), str):
            prompts.append(prompt_from_text(item["prompt"]))
        elif isinstance(item.get("messages"), list) and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in item["messages"]
        ):
            prompts.append(Prompt(messages=tuple(item["messages"])))
        else:
            raise PromptsFileError(
                f"{where}: a JSON line needs 'prompt' (string) or 'messages' (list of role/content)"
            )
    if not prompts:
        raise PromptsFileError(f"{path}: no prompts in the file")
    return prompts


class LoadTestConfig(BaseModel):
    """Everything that defines a run; written into the results JSON as ``config``."""

    base_url: str
    adapters: list[str | None] = Field(default_factory=lambda: list[str | None]([None]))
    """Adapter refs to spread requests over; None is the bare base model."""
    weights: list[float] | None = None
    """Relative share of requests per adapter (same length as ``adapters``); default: equal."""
    concurrency: int | None = None
    rate: float | None = None
    """Mean arrivals per second (Poisson process)."""
    requests: int | None = None
    duration_s: float | None = None
    max_duration_s: float | None = None
    """Hard cap on the whole run; default 600 s, or duration + 60 s."""
    max_tokens: int = 64
    temperature: float = 0.0
    stream: bool = False
    ignore_eos: bool = False
    endpoint: Literal["chat", "completion"] = "chat"
    prompts_file: str | None = None
    seed: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = 0
    """Retries per request on 429/503/connection errors; 0 measures the server as it is."""

    @model_validator(mode="after")
    def _check(self) -> LoadTestConfig:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of --concurrency or --rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("--rate must be > 0")
        if self.requests is None and self.duration_s is None:
            raise ValueError("give --requests, --duration, or both")
        if self.requests is not None and self.requests < 1:
            raise ValueError("--requests must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("--duration must be > 0")
        if not self.adapters:
            raise ValueError("--adapters is empty")
        if self.weights is not None:
            if len(self.weights) != len(self.adapters):
                raise ValueError(
                    f"--weights has {len(self.weights)} values for {len(self.adapters)} adapters"
                )
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("--weights must be non-negative and not all zero")
        if self.max_tokens < 1:
            raise ValueError("--max-tokens must be >= 1")
        return self

    @property
    def hard_cap_s(self) -> float:
        if self.max_duration_s is not None:
            return self.max_duration_s
        if self.duration_s is not None:
            return self.duration_s + DURATION_GRACE_S
        return DEFAULT_HARD_CAP_S


@dataclass
class RequestRecord:
    """What happened to one request. Times in seconds; ``start_s`` is relative to the run's start."""

    index: int
    adapter: str
    start_s: float
    status: str = "ok"
    """``ok``, the HTTP status of the error (``"429"``), ``connection``, ``timeout`` or ``cancelled``."""
    error: str | None = None
    e2e_s: float | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def end_s(self) -> float | None:
        return None if self.e2e_s is None else self.start_s + self.e2e_s


class Breakdown(BaseModel):
    """Counts, throughput and latency percentiles over a set of requests."""

    requests: int
    completed: int
    errors: dict[str, int]
    """Failed requests by status: HTTP code, ``connection``, ``timeout``, ``cancelled``."""
    prompt_tokens: int
    output_tokens: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats


def breakdown(records: Sequence[RequestRecord], duration_s: float) -> Breakdown:
    """Summarize ``records`` over a run of ``duration_s`` seconds."""
    done = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens or 0 for r in done)
    span = max(duration_s, 1e-9)
    return Breakdown(
        requests=len(records),
        completed=len(done),
        errors=dict(sorted(Counter(r.status for r in records if not r.ok).items())),
        prompt_tokens=sum(r.prompt_tokens or 0 for r in done),
        output_tokens=output_tokens,
        requests_per_s=len(done) / span,
        output_tokens_per_s=output_tokens / span,
        ttft_ms=LatencyStats.of_seconds([r.ttft_s for r in done if r.ttft_s is not None]),
        itl_ms=LatencyStats.of_seconds([gap for r in done for gap in r.itl_s]),
        e2e_ms=LatencyStats.of_seconds([r.e2e_s for r in done if r.e2e_s is not None]),
    )


class LoadTestResult(BaseModel):
    """The results JSON: the overall breakdown at top level, then per adapter, config and machine."""

    requests: int
    completed: int
    errors: dict[str, int]
    prompt_tokens: int
    output_tokens: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    retries: int
    stopped_by: str
    """``requests`` (count reached), ``duration``, or ``hard_cap`` (in-flight requests cancelled)."""
    per_adapter: dict[str, Breakdown]
    started_at: str
    config: LoadTestConfig
    machine: dict[str, Any]
    server: dict[str, Any]
    samples: list[dict[str, Any]]
    """Every request: adapter, start, status, latencies, token counts."""


def machine_info() -> dict[str, Any]:
    """Where the load generator ran (the server runs on the same machine in our benchmarks)."""
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gb = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "memory_gb": memory_gb,
        "python": sys.version.split()[0],
    }


class Workload:
    """Deterministic stream of (adapter, prompt) picks from the seed."""

    def __init__(self, config: LoadTestConfig, prompts: Sequence[Prompt]) -> None:
        self._rng = random.Random(config.seed)
        self._adapters = list(config.adapters)
        self._weights = list(config.weights) if config.weights else [1.0] * len(self._adapters)
        self._prompts = list(prompts)

    def next(self) -> tuple[str | None, Prompt]:
        adapter = self._rng.choices(self._adapters, weights=self._weights)[0]
        return adapter, self._rng.choice(self._prompts)

    def interarrival_s(self, rate: float) -> float:
        """Poisson arrivals: exponential gaps with mean 1/rate."""
        return self._rng.expovariate(rate)


RecordObserver = Callable[[RequestRecord], None]
Slot = tuple[int, str | None, Prompt]


class LoadTester:
    """Runs one load test with an :class:`AsyncLorayardClient`."""

    def __init__(
        self,
        config: LoadTestConfig,
        *,
        api_key: str | None = None,
        prompts: Sequence[Prompt] | None = None,
        on_record: RecordObserver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``prompts``: what to send (default: ``config.prompts_file``'s, else the built-in prompts);
        ``transport``: an httpx transport to send through instead of the network."""
        self.config = config
        if not prompts and config.prompts_file:
            prompts = load_prompts(Path(config.prompts_file))
        self.prompts = list(prompts) if prompts else [prompt_from_text(p) for p in DEFAULT_PROMPTS]
        if config.endpoint == "completion" and any(p.text is None for p in self.prompts):
            raise PromptsFileError("the completions endpoint needs plain prompts, not 'messages' items")
        self.records: list[RequestRecord] = []
        self.retries = 0
        self._on_record = on_record
        self._workload = Workload(config, self.prompts)
        self._client = AsyncLorayardClient(
            config.base_url,
            api_key=api_key,
            timeout=config.timeout_s,
            retry=RetryPolicy(max_attempts=config.retries + 1),
            on_retry=self._count_retry,
            seed=config.seed,
            max_connections=config.concurrency or 1000,
            transport=transport,
        )
        self._issued = 0
        self._t0 = 0.0

    def _count_retry(self, _event: object) -> None:
        self.retries += 1

    async def run(self) -> LoadTestResult:
        """Run to completion (count, duration or hard cap) and summarize."""
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        async with self._client:
            server = await self._server_info()
            self._t0 = time.perf_counter()
            hit_cap = False
            try:
                async with asyncio.timeout(self.config.hard_cap_s):
                    if self.config.concurrency is not None:
                        await self._closed_loop(self.config.concurrency)
                    else:
                        await self._open_loop(self.config.rate or 1.0)
            except TimeoutError:
                hit_cap = True
            duration_s = time.perf_counter() - self._t0
        if hit_cap:
            stopped_by = "hard_cap"
        elif self.config.requests is not None and self._issued >= self.config.requests:
            stopped_by = "requests"
        else:
            stopped_by = "duration"
        return self._result(duration_s, stopped_by, started_at, server)

    async def _server_info(self) -> dict[str, Any]:
        models = await self._client.models()
        base_models = [m.id for m in models if not m.is_adapter]
        if base_models and self._client.model is None:
            # Plain OpenAI servers (vLLM) need `model` even for the base; ours accepts it too.
            self._client.model = base_models[0]
        return {
            "base_url": self.config.base_url,
            "models": [m.id for m in models],
            "base_models": base_models,
        }

    def _time_is_up(self) -> bool:
        limit = self.config.duration_s
        return limit is not None and time.perf_counter() - self._t0 >= limit

    def _take_slot(self) -> Slot | None:
        """The next request (index, adapter, prompt), or None when the count or the duration is reached.

        The adapter and prompt are drawn here, in issue order, so request i is the same in every run
        with the same seed whatever the completion order.
        """
        if self.config.requests is not None and self._issued >= self.config.requests:
            return None
        if self._time_is_up():
            return None
        self._issued += 1
        return (self._issued - 1, *self._workload.next())

    async def _closed_loop(self, concurrency: int) -> None:
        async def worker() -> None:
            while (slot := self._take_slot()) is not None:
                await self._one(*slot)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def _open_loop(self, rate: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            while (slot := self._take_slot()) is not None:
                task = asyncio.create_task(self._one(*slot))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(self._workload.interarrival_s(rate))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _one(self, index: int, adapter: str | None, prompt: Prompt) -> None:
        record = RequestRecord(
            index=index, adapter=adapter or BASE_LABEL, start_s=time.perf_counter() - self._t0
        )
        self.records.append(record)
        try:
            await self._send(record, adapter, prompt)
        except asyncio.CancelledError:
            record.status = "cancelled"
            raise
        except APIStatusError as exc:
            record.status, record.error = str(exc.status_code), exc.message
        except APITimeoutError as exc:
            record.status, record.error = "timeout", str(exc)
        except APIConnectionError as exc:
            record.status, record.error = "connection", str(exc)
        except LorayardError as exc:
            record.status, record.error = "error", str(exc)
        finally:
            if self._on_record is not None and record.status != "cancelled":
                self._on_record(record)

    async def _send(self, record: RequestRecord, adapter: str | None, prompt: Prompt) -> None:
        sampling: dict[str, Any] = {
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }
        if self.config.ignore_eos:
            sampling["ignore_eos"] = True
        if self.config.endpoint == "chat":
            target: Any = list(prompt.messages)
        else:
            target = prompt.text
        start = time.perf_counter()
        if self.config.stream:
            stream = (
                self._client.chat_stream(target, adapter=adapter, **sampling)
                if self.config.endpoint == "chat"
                else self._client.complete_stream(target, adapter=adapter, **sampling)
            )
            async with stream:
                async for _ in stream:
                    pass
            record.e2e_s = time.perf_counter() - start
            times = stream.delta_times
            if times:
                record.ttft_s = times[0] - start
                record.itl_s = [later - earlier for earlier, later in itertools.pairwise(times)]
            usage, record.finish_reason = stream.usage, stream.finish_reason
        else:
            result = (
                await self._client.chat(target, adapter=adapter, **sampling)
                if self.config.endpoint == "chat"
                else await self._client.complete(target, adapter=adapter, **sampling)
            )
            record.e2e_s = time.perf_counter() - start
            usage, record.finish_reason = result.usage, result.finish_reason
        if usage is not None:
            record.prompt_tokens, record.output_tokens = usage.prompt_tokens, usage.completion_tokens

    def _result(
        self, duration_s: float, stopped_by: str, started_at: str, server: dict[str, Any]
    ) -> LoadTestResult:
        overall = breakdown(self.records, duration_s)
        labels = sorted({r.adapter for r in self.records})
        return LoadTestResult(
            **overall.model_dump(),
            duration_s=duration_s,
            retries=self.retries,
            stopped_by=stopped_by,
            per_adapter={
                label: breakdown([r for r in self.records if r.adapter == label], duration_s)
                for label in labels
            },
            started_at=started_at,
            config=self.config,
            machine=machine_info(),
            server=server,
            samples=[asdict(r) for r in sorted(self.records, key=lambda r: r.index)],
        )


def run_loadtest(
    config: LoadTestConfig,
    *,
    api_key: str | None = None,
    prompts: Sequence[Prompt] | None = None,
    on_record: RecordObserver | None = None,
) -> LoadTestResult:
    """Run a load test to completion (blocking)."""
    tester = LoadTester(config, api_key=api_key, prompts=prompts, on_record=on_record)
    return asyncio.run(tester.run())
