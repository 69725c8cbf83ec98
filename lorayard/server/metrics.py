"""Every Prometheus metric of the server, defined in one place.

Latency histograms are labelled by ``adapter`` and ``version`` (``base`` for both on the plain base
model; ``vN``, or ``plain`` for a plain PEFT folder): per-adapter TTFT, inter-token latency and
end-to-end latency are what multi-adapter operators ask for, and per version they compare a canary
with the version it may replace.
Metrics live in a per-app :class:`CollectorRegistry` so tests can build several apps in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from lorayard.server.engine.types import EngineStats

BASE_LABEL = "base"
"""The ``adapter`` and ``version`` label values for requests without an adapter."""
ADAPTER_LABELS = ("adapter", "version")
UNRESOLVED_LABEL = "unresolved"
"""The ``adapter`` label of a request refused before an adapter was resolved (bad body, unknown
adapter): never the name the client sent, so clients cannot grow the label set."""


def version_label(version: int | None) -> str:
    """The ``version`` label (and the response's version header): ``vN``, or ``plain`` for a plain
    PEFT folder."""
    return "plain" if version is None else f"v{version}"


def adapter_labels(name: str, version: int | None) -> dict[str, str]:
    """The ``adapter`` and ``version`` labels of a leased adapter version."""
    return {"adapter": name, "version": version_label(version)}


COUNTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
"""The routes ``lorayard_requests_total`` counts (every answer, 2xx to 5xx)."""

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1,
    1.5,
    2.5,
    5,
    10,
    20,
    40,
    80,
)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class ServerMetrics:
    registry: CollectorRegistry
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_latency: Histogram
    prompt_tokens: Histogram
    output_tokens: Histogram
    requests: Counter
    running: Gauge
    waiting: Gauge
    batch_size: Gauge
    loaded_adapters: Gauge
    kv_cache_usage: Gauge
    kv_blocks: Gauge
    preemptions: Counter
    prefix_cache_queries: Counter
    prefix_cache_hits: Counter
    adapter_load_seconds: Histogram
    grammar_compiles: Counter

    def log_engine_stats(self, stats: EngineStats) -> None:
        """Publish one engine step's snapshot (called on the engine thread after every step)."""
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.batch_size.set(stats.batch_size)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        free = stats.kv_blocks_total - stats.kv_blocks_used - stats.kv_blocks_cached
        self.kv_blocks.labels(state="used").set(stats.kv_blocks_used)
        self.kv_blocks.labels(state="cached").set(stats.kv_blocks_cached)
        self.kv_blocks.labels(state="free").set(free)
        if stats.step_preemptions:
            self.preemptions.inc(stats.step_preemptions)

    def observe_adapter_load(self, name: str, version: int | None, seconds: float) -> None:
        self.adapter_load_seconds.labels(**adapter_labels(name, version)).observe(seconds)

    @classmethod
    def create(cls) -> ServerMetrics:
        registry = CollectorRegistry()
        prefix = "lorayard"
        return cls(
            registry=registry,
            time_to_first_token=Histogram(
                f"{prefix}_time_to_first_token_seconds",
                "Time from request arrival to the first output token.",
                ADAPTER_LABELS,
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            inter_token_latency=Histogram(
                f"{prefix}_inter_token_latency_seconds",
                "Time between consecutive output tokens.",
                ADAPTER_LABELS,
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            e2e_latency=Histogram(
                f"{prefix}_e2e_request_latency_seconds",
                "Time from request arrival to its last token.",
                ADAPTER_LABELS,
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            prompt_tokens=Histogram(
                f"{prefix}_prompt_tokens",
                "Prompt tokens per request.",
                ADAPTER_LABELS,
                buckets=_TOKEN_BUCKETS,
                registry=registry,
            ),
            output_tokens=Histogram(
                f"{prefix}_output_tokens",
                "Output tokens per request.",
                ADAPTER_LABELS,
                buckets=_TOKEN_BUCKETS,
                registry=registry,
            ),
            requests=Counter(
                f"{prefix}_requests",
                "Answered generation requests by adapter, version and HTTP status code, refusals included"
                " (a stream that fails after its 200 header counts under the status of its error event).",
                [*ADAPTER_LABELS, "status"],
                registry=registry,
            ),
            running=Gauge(
                f"{prefix}_num_requests_running", "Requests in the running batch.", registry=registry
            ),
            waiting=Gauge(
                f"{prefix}_num_requests_waiting", "Requests queued for admission.", registry=registry
            ),
            batch_size=Gauge(
                f"{prefix}_batch_size", "Rows in the last batched decode step.", registry=registry
            ),
            loaded_adapters=Gauge(
                f"{prefix}_loaded_adapters", "Adapters resident in engine memory.", registry=registry
            ),
            kv_cache_usage=Gauge(
                f"{prefix}_kv_cache_usage_ratio", "Fraction of the KV cache in use.", registry=registry
            ),
            kv_blocks=Gauge(
                f"{prefix}_kv_cache_blocks",
                "KV blocks by state: used (held by running requests), cached (a reusable prefix no"
                " request holds, reclaimed least recently used first), free.",
                ["state"],
                registry=registry,
            ),
            preemptions=Counter(
                f"{prefix}_preemptions",
                "Requests preempted because the KV pool ran dry (recomputed when readmitted).",
                registry=registry,
            ),
            prefix_cache_queries=Counter(
                f"{prefix}_prefix_cache_query_tokens",
                "Prompt tokens looked up in the prefix cache.",
                ADAPTER_LABELS,
                registry=registry,
            ),
            prefix_cache_hits=Counter(
                f"{prefix}_prefix_cache_hit_tokens",
                "Prompt tokens whose KV came from the prefix cache (computed before under the same"
                " adapter version); hits / queries is the hit rate.",
                ADAPTER_LABELS,
                registry=registry,
            ),
            adapter_load_seconds=Histogram(
                f"{prefix}_adapter_load_seconds",
                "Time to load an adapter from the volume.",
                ADAPTER_LABELS,
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            grammar_compiles=Counter(
                f"{prefix}_grammar_compiles",
                "Structured-output grammar compiles by outcome: compiled (or found cached), invalid"
                " (the schema refused), timeout (past --grammar-compile-timeout), abandoned (its client"
                " left while it waited for a compile thread: it never ran).",
                ["outcome"],
                registry=registry,
            ),
        )
