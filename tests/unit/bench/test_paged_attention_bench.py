"""Smoke test: the paged-attention bench checks every variant against the engine's and writes its report.

It loads no model, so it is not in test_suites.py's tiny-model table; the numbers mean nothing here."""

from __future__ import annotations

import json
import math

from bench import paged_attention, record


def test_bench_runs_quick_and_writes_its_report(tmp_path):
    args = paged_attention.parse_args(["--quick", "--calls", "1", "--out", str(tmp_path)])
    result = paged_attention.run(args)
    assert {r["variant"] for r in result.rows} == set(paged_attention.VARIANTS)
    assert result.headline and all(math.isfinite(h["value"]) and h["value"] > 0 for h in result.headline)
    record.write_result(result, tmp_path, paged_attention.details(result))
    paged_attention._plot(result, tmp_path)
    assert json.loads((tmp_path / "result.json").read_text())["headline"] == result.headline
    assert (tmp_path / "times.png").is_file()
    assert "token_major" in (tmp_path / "table.md").read_text()
