import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lorayard.client.stats import LatencyStats, percentile

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=50), q=st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_percentile_edges():
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5  # order of input does not matter
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q"):
        percentile([1.0], 101)


def test_latency_stats_are_milliseconds():
    seconds = [0.010, 0.020, 0.030, 0.040, 1.0]
    stats = LatencyStats.of_seconds(seconds)
    millis = np.array(seconds) * 1000
    assert stats.count == 5
    assert stats.mean == pytest.approx(millis.mean())
    for q, value in ((50, stats.p50), (90, stats.p90), (99, stats.p99)):
        assert value == pytest.approx(np.percentile(millis, q))
    assert LatencyStats.of_seconds([]) == LatencyStats(count=0)
