"""The run summary both peer suites share: how output tokens are counted and what a run reports."""

from __future__ import annotations

import pytest

from bench import peer


def _sample(**fields):
    base = {"status": "ok", "output_tokens": None, "finish_reason": "length", "ttft_s": 0.1, "itl_s": []}
    return {**base, **fields}


def test_sample_tokens_prefers_usage_then_length_then_deltas():
    assert peer.sample_tokens(_sample(output_tokens=7), 64) == (7, "usage")
    assert peer.sample_tokens(_sample(), 64) == (64, "length")
    stopped = _sample(finish_reason="stop", itl_s=[0.01, 0.02])
    assert peer.sample_tokens(stopped, 64) == (3, "deltas")
    assert peer.sample_tokens(_sample(finish_reason="stop", ttft_s=None), 64) == (0, "deltas")


def test_summarize_run_counts_only_completed_requests():
    samples = [
        _sample(output_tokens=10, ttft_s=0.1, itl_s=[0.01, 0.03], e2e_s=0.5),
        _sample(ttft_s=0.3, itl_s=[0.02], e2e_s=0.7),  # no usage, stopped by length: max_tokens
        {"status": "503", "output_tokens": None, "ttft_s": None, "itl_s": []},
    ]
    row = peer.summarize_run(samples, duration_s=2.0, max_tokens=10)
    assert row["requests"] == 3
    assert row["completed"] == 2
    assert row["errors"] == 1
    assert row["output_tokens"] == 20
    assert row["tokens_per_s"] == pytest.approx(10.0)
    assert row["tokens_counted_by"] == ["length", "usage"]
    assert row["ttft_p50_ms"] == pytest.approx(200.0)
    assert row["itl_p50_ms"] == pytest.approx(20.0)
    assert row["finished_by_length"] == 2
