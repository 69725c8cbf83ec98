"""Every Prometheus metric of the server, defined in one place.

Latency histograms are labelled by ``adapter`` and ``version`` (``base`` for both on the plain base
model; ``vN``, or ``plain`` for a plain PEFT folder): per-adapter TTFT, inter-token latency and
end-to-end latency are what multi-adapter operators ask for, and per version they compare a canary
with the version it may replace.
Metrics live in a per-app :class:`CollectorRegistry` so tests can build several apps in one process.

The model-server protocol of the Gateway API Inference Extension (its ``003-model-server-protocol``
proposal; the endpoint picker routes by these): queued and running requests, KV-cache utilization
(0..1), the cache config (``block_size``, ``num_gpu_blocks`` labels) and the LoRA info gauge
(``max_lora``, ``running_lora_adapters``, ``waiting_lora_adapters`` labels, the time of its last
update as its value). Each is published under our name and under vLLM's (:data:`PICKER_ALIASES`),
the names the picker reads by default: its metric flags are deprecated and refused since v1.5, so
aliases work with every picker version without configuration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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

LORA_INFO_LABELS = ("max_lora", "running_lora_adapters", "waiting_lora_adapters")
CACHE_CONFIG_LABELS = ("block_size", "num_gpu_blocks")
PICKER_ALIASES = {
    "lorayard_num_requests_waiting": ("vllm:num_requests_waiting",),
    "lorayard_num_requests_running": ("vllm:num_requests_running",),
    # the picker's default before and after vLLM renamed it
    "lorayard_kv_cache_usage_ratio": ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    "lorayard_lora_requests_info": ("vllm:lora_requests_info",),
    "lorayard_cache_config_info": ("vllm:cache_config_info",),
}
"""Our protocol families and the vLLM names the endpoint picker reads by default (same values)."""


@dataclass
class ProtocolGauges:
    """One protocol family under our name and its picker aliases: every write goes to all of them."""

    gauges: tuple[Gauge, ...]

    @classmethod
    def create(
        cls, name: str, documentation: str, registry: CollectorRegistry, labels: tuple[str, ...] = ()
    ) -> ProtocolGauges:
        names = (name, *PICKER_ALIASES[name])
        return cls(tuple(Gauge(n, documentation, labels, registry=registry) for n in names))

    def set(self, value: float, **labels: str) -> None:
        for gauge in self.gauges:
            (gauge.labels(**labels) if labels else gauge).set(value)

    def remove(self, *label_values: str) -> None:
        for gauge in self.gauges:
            gauge.remove(*label_values)


@dataclass
class ServerMetrics:
    registry: CollectorRegistry
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_latency: Histogram
    prompt_tokens: Histogram
    output_tokens: Histogram
    requests: Counter
    running: ProtocolGauges
    waiting: ProtocolGauges
    batch_size: Gauge
    loaded_adapters: Gauge
    kv_cache_usage: ProtocolGauges
    lora_info: ProtocolGauges
    cache_config: ProtocolGauges
    kv_blocks: Gauge
    preemptions: Counter
    prefix_cache_queries: Counter
    prefix_cache_hits: Counter
    adapter_load_seconds: Histogram
    grammar_compiles: Counter
    vision_encoded_images: Counter
    max_lora: int = 0
    """Distinct adapters one batch can hold (the engine's --max-loaded-adapters); set by
    :meth:`log_engine_config`."""
    _lora_series: tuple[str, ...] | None = field(default=None, repr=False)
    """The label values of the LoRA info series published last (engine thread only)."""

    def log_engine_config(self, *, max_lora: int, block_size: int, num_blocks: int) -> None:
        """Publish what the engine was built with (once, when it starts)."""
        self.max_lora = max_lora
        self.cache_config.set(1, block_size=str(block_size), num_gpu_blocks=str(num_blocks))
        # before any request: a picker that finds no LoRA series marks the replica unhealthy
        self._log_lora_info((), ())

    def log_engine_stats(self, stats: EngineStats) -> None:
        """Publish one engine step's snapshot (called on the engine thread after every step)."""
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.batch_size.set(stats.batch_size)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self._log_lora_info(stats.running_adapters, stats.waiting_adapters)
        free = stats.kv_blocks_total - stats.kv_blocks_used - stats.kv_blocks_cached
        self.kv_blocks.labels(state="used").set(stats.kv_blocks_used)
        self.kv_blocks.labels(state="cached").set(stats.kv_blocks_cached)
        self.kv_blocks.labels(state="free").set(free)
        if stats.step_preemptions:
            self.preemptions.inc(stats.step_preemptions)

    def _log_lora_info(self, running: tuple[str, ...], waiting: tuple[str, ...]) -> None:
        """One series whose labels name the adapters in use and whose value is the update time.

        The picker reads the series with the largest value: the new one is set before the old one is
        removed, so a scrape in between sees both and still picks the current one, never none.
        """
        series = (str(self.max_lora), ",".join(running), ",".join(waiting))
        self.lora_info.set(time.time(), **dict(zip(LORA_INFO_LABELS, series, strict=True)))
        if self._lora_series is not None and self._lora_series != series:
            self.lora_info.remove(*self._lora_series)
        self._lora_series = series

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
            running=ProtocolGauges.create(
                f"{prefix}_num_requests_running", "Requests in the running batch.", registry
            ),
            waiting=ProtocolGauges.create(
                f"{prefix}_num_requests_waiting", "Requests queued for admission.", registry
            ),
            batch_size=Gauge(
                f"{prefix}_batch_size", "Rows in the last batched decode step.", registry=registry
            ),
            loaded_adapters=Gauge(
                f"{prefix}_loaded_adapters", "Adapters resident in engine memory.", registry=registry
            ),
            kv_cache_usage=ProtocolGauges.create(
                f"{prefix}_kv_cache_usage_ratio",
                "Fraction of the KV cache held by live requests, 0..1 (cached prefixes count as free).",
                registry,
            ),
            lora_info=ProtocolGauges.create(
                f"{prefix}_lora_requests_info",
                "Adapters in use: max_lora (distinct adapters a batch can hold), running_lora_adapters"
                " and waiting_lora_adapters (comma-separated names of the running and waiting"
                " requests' adapters); the value is the time of the last update (Unix seconds).",
                registry,
                LORA_INFO_LABELS,
            ),
            cache_config=ProtocolGauges.create(
                f"{prefix}_cache_config_info",
                "The KV cache's shape: block_size (tokens per block) and num_gpu_blocks (blocks in the"
                " pool, on any device); the value is always 1.",
                registry,
                CACHE_CONFIG_LABELS,
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
            vision_encoded_images=Counter(
                f"{prefix}_vision_encoded_images",
                "Images run through a vision-language base's vision tower (a request whose image"
                " tokens all come from the prefix cache runs none).",
                registry=registry,
            ),
        )
