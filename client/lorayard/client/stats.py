"""Latency statistics for the load tester: percentiles and a p50/p90/p99/mean summary."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel

PERCENTILES = (50, 90, 99)
"""The percentiles every latency summary reports."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    Same definition as ``numpy.percentile(values, q)`` (its default "linear" method): rank
    ``q/100 * (n-1)`` in the sorted values, interpolated between its two neighbours.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    fraction = rank - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


class LatencyStats(BaseModel):
    """Summary of one latency sample, in milliseconds; all None when there are no values."""

    count: int = 0
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    mean: float | None = None

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> LatencyStats:
        """Summarize latencies measured in seconds, reported in milliseconds."""
        if not values:
            return cls()
        millis = [value * 1000.0 for value in values]
        p50, p90, p99 = (percentile(millis, q) for q in PERCENTILES)
        return cls(count=len(millis), p50=p50, p90=p90, p99=p99, mean=sum(millis) / len(millis))
