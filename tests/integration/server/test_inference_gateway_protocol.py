"""The model-server protocol of the Gateway API Inference Extension, read as its endpoint picker reads it.

The picker scrapes /metrics under vLLM's names (its defaults): queued and running requests, KV-cache
use (0..1), the cache config labels, and the LoRA info gauge, of whose series it takes the one with
the largest value (the last update's time) and splits its adapter labels on commas.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorayard.testing.server import metric_value

from .conftest import start_server

MAX_BATCH = 2
MAX_LORA = 4
ADAPTERS = ("qv8", "all16")


@dataclass(frozen=True)
class PickerView:
    """One scrape as the endpoint picker sees it."""

    queued: float
    running: float
    kv_cache_usage: float
    max_lora: int
    running_adapters: frozenset[str]
    waiting_adapters: frozenset[str]
    lora_updated: float
    lora_series: int
    block_size: int
    num_blocks: int


def _adapters(label: str) -> frozenset[str]:
    return frozenset(name for name in label.split(",") if name)


def picker_view(text: str) -> PickerView:
    """Read a /metrics text the way the picker's vLLM metric mapping does."""
    samples = {family.name: family.samples for family in text_string_to_metric_families(text)}
    lora = samples["vllm:lora_requests_info"]
    latest = max(lora, key=lambda sample: sample.value)  # the picker keeps the newest series
    (cache,) = samples["vllm:cache_config_info"]
    (queued,), (running,) = samples["vllm:num_requests_waiting"], samples["vllm:num_requests_running"]
    (usage,) = samples["vllm:gpu_cache_usage_perc"]
    return PickerView(
        queued=queued.value,
        running=running.value,
        kv_cache_usage=usage.value,
        max_lora=int(latest.labels["max_lora"]),
        running_adapters=_adapters(latest.labels["running_lora_adapters"]),
        waiting_adapters=_adapters(latest.labels["waiting_lora_adapters"]),
        lora_updated=latest.value,
        lora_series=len(lora),
        block_size=int(cache.labels["block_size"]),
        num_blocks=int(cache.labels["num_gpu_blocks"]),
    )


@pytest.fixture(scope="module")
def small_batch_server(real_volume, tmp_path_factory):
    """Two rows a step: a burst of requests for two adapters queues, as on a busy replica."""
    args = ["--adapters-dir", str(real_volume), "--max-batch-size", str(MAX_BATCH)]
    args += ["--max-loaded-adapters", str(MAX_LORA)]
    server = start_server(args, tmp_path_factory.mktemp("logs") / "gateway-protocol.log")
    yield server
    server.stop()


def _burst(url: str, per_adapter: int) -> list[int]:
    """``per_adapter`` requests for each adapter at once, alternating; their status codes."""

    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            bodies = [
                {"model": name, "prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True}
                for _ in range(per_adapter)
                for name in ADAPTERS
            ]
            return await asyncio.gather(*(client.post(url, json=body) for body in bodies))

    return [response.status_code for response in asyncio.run(send())]


def test_the_picker_reads_queue_kv_cache_and_lora_affinity_under_load(small_batch_server):
    metrics_url = small_batch_server.base_url + "/metrics"
    idle = picker_view(httpx.get(metrics_url).text)  # published when the engine started
    assert idle.lora_series == 1 and idle.lora_updated <= time.time()
    assert idle.max_lora == MAX_LORA and idle.block_size > 0
    text = httpx.get(metrics_url).text
    pool_blocks = sum(
        metric_value(text, "lorayard_kv_cache_blocks", state=s) for s in ("used", "cached", "free")
    )
    assert idle.num_blocks == pool_blocks > 0

    statuses: list[int] = []
    load = threading.Thread(target=lambda: statuses.extend(_burst(small_batch_server.v1 + "/completions", 3)))
    load.start()
    views: list[PickerView] = []
    while load.is_alive():
        views.append(picker_view(httpx.get(metrics_url).text))
        time.sleep(0.05)
    load.join()
    assert statuses == [200] * 6

    for view in views:
        assert 0 <= view.running <= MAX_BATCH and 0 <= view.queued <= 6
        assert 0.0 <= view.kv_cache_usage <= 1.0
        # the names are the `model` values clients send: what the picker matches a request against
        assert view.running_adapters <= set(ADAPTERS) and view.waiting_adapters <= set(ADAPTERS)
        assert len(view.running_adapters) <= min(MAX_LORA, MAX_BATCH)
        assert (view.max_lora, view.block_size, view.num_blocks) == (
            MAX_LORA,
            idle.block_size,
            idle.num_blocks,
        )
        assert idle.lora_updated <= view.lora_updated <= time.time()
    # the picker's signals moved with the load: a queue formed, both adapters ran, the KV cache filled
    assert max(view.queued for view in views) >= 1
    assert any(view.waiting_adapters for view in views)
    assert set().union(*(view.running_adapters for view in views)) == set(ADAPTERS)
    assert max(view.kv_cache_usage for view in views) > 0
    updates = [view.lora_updated for view in views]
    assert updates == sorted(updates)

    after = picker_view(httpx.get(metrics_url).text)
    assert (after.queued, after.running, after.kv_cache_usage) == (0, 0, 0)
    assert after.running_adapters == after.waiting_adapters == frozenset()
    assert after.lora_series == 1  # a stale series never outlives its update


def test_our_names_and_the_pickers_carry_the_same_values(small_batch_server):
    text = httpx.get(small_batch_server.base_url + "/metrics").text
    for ours, picker in (
        ("lorayard_num_requests_waiting", "vllm:num_requests_waiting"),
        ("lorayard_num_requests_running", "vllm:num_requests_running"),
        ("lorayard_kv_cache_usage_ratio", "vllm:gpu_cache_usage_perc"),
        ("lorayard_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc"),
    ):
        assert f"# TYPE {picker} gauge" in text
        assert metric_value(text, ours) == metric_value(text, picker)
    samples = {f.name: f.samples for f in text_string_to_metric_families(text)}
    for ours, picker in (
        ("lorayard_lora_requests_info", "vllm:lora_requests_info"),
        ("lorayard_cache_config_info", "vllm:cache_config_info"),
    ):
        assert [s.labels for s in samples[ours]] == [s.labels for s in samples[picker]]
