"""The load test's picture: latency distributions per adapter and throughput over time."""

from __future__ import annotations

import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

import matplotlib.pyplot as plt
from lorayard.client.loadtest import LoadTestResult, RequestRecord


def _records(result: LoadTestResult) -> list[RequestRecord]:
    return [RequestRecord(**sample) for sample in result.samples]


def plot_loadtest(result: LoadTestResult, path: Path) -> None:
    """Box plots of end-to-end latency and TTFT per adapter, and output tokens/s over time."""
    records = [r for r in _records(result) if r.ok]
    labels = sorted({r.adapter for r in records}) or ["(none)"]
    streamed = any(r.ttft_s is not None for r in records)
    panels = 3 if streamed else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), constrained_layout=True)

    _boxplot(
        axes[0], labels, [[r.e2e_s * 1000 for r in records if r.adapter == a and r.e2e_s] for a in labels]
    )
    axes[0].set_title("end-to-end latency")
    if streamed:
        _boxplot(
            axes[1],
            labels,
            [[r.ttft_s * 1000 for r in records if r.adapter == a and r.ttft_s is not None] for a in labels],
        )
        axes[1].set_title("time to first token")
    _throughput(axes[-1], records, result.duration_s)

    config = result.config
    mode = f"concurrency {config.concurrency}" if config.concurrency else f"rate {config.rate}/s"
    figure.suptitle(
        f"{result.completed}/{result.requests} requests, {mode}, max_tokens {config.max_tokens}: "
        f"{result.requests_per_s:.2f} req/s, {result.output_tokens_per_s:.1f} output tok/s"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _boxplot(axis: plt.Axes, labels: list[str], samples: list[list[float]]) -> None:
    present = [(label, values) for label, values in zip(labels, samples, strict=True) if values]
    if present:
        axis.boxplot(
            [values for _, values in present], tick_labels=[label for label, _ in present], showfliers=False
        )
        # Every request as a dot too: with a few dozen requests the box alone hides the spread.
        spread = random.Random(0)
        for position, (_, values) in enumerate(present, start=1):
            xs = [position + spread.uniform(-0.12, 0.12) for _ in values]
            axis.scatter(xs, values, s=10, alpha=0.5, color="C0", zorder=3)
    axis.set_ylabel("ms")
    axis.set_xlabel("adapter")
    axis.grid(axis="y", alpha=0.3)


def _token_times(record: RequestRecord) -> list[float]:
    """When each output token arrived (seconds since start): from the stream's deltas when there are
    any (a delta may carry several tokens: they share its time), else spread over the request."""
    tokens = record.output_tokens or 0
    if not tokens or record.e2e_s is None:
        return []
    if record.ttft_s is not None:
        arrivals = [record.start_s + record.ttft_s]
        for gap in record.itl_s:
            arrivals.append(arrivals[-1] + gap)
    else:
        arrivals = [record.start_s + record.e2e_s * (i + 1) / tokens for i in range(tokens)]
    return [arrivals[min(len(arrivals) - 1, i * len(arrivals) // tokens)] for i in range(tokens)]


def _throughput(axis: plt.Axes, records: list[RequestRecord], duration_s: float) -> None:
    """Output tokens per second in fixed time bins (by token arrival), and requests in flight."""
    bins = max(10, min(60, round(duration_s)))
    width = max(duration_s, 1e-9) / bins
    tokens = [0.0] * bins
    for record in records:
        for arrival in _token_times(record):
            tokens[min(bins - 1, int(arrival / width))] += 1
    starts = [i * width for i in range(bins)]
    axis.bar(starts, [t / width for t in tokens], width=width, align="edge", alpha=0.7)
    axis.set_xlabel("seconds since start")
    axis.set_ylabel("output tokens / s")
    axis.set_title("throughput over time")
    axis.grid(axis="y", alpha=0.3)
    middles = [start + width / 2 for start in starts]
    in_flight = [sum(1 for r in records if r.end_s is not None and r.start_s <= t < r.end_s) for t in middles]
    twin = axis.twinx()
    twin.plot(middles, in_flight, color="C1", marker=".")
    twin.set_ylabel("requests in flight", color="C1")
    twin.set_ylim(bottom=0, top=max(in_flight, default=0) + 1)
