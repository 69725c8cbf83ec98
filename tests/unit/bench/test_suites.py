"""Smoke test: every quick-suite's code path runs end to end on the tiny model and writes its report.

The numbers mean nothing on a tiny random model; what is checked is that each suite measures, fills
finite headline figures, writes result.json / table.md / a PNG, and that bench.report reads them back.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from bench import (
    adapter_scale,
    decode_roofline,
    grammar,
    head_of_line,
    multi_adapter,
    naive,
    paged_kv,
    record,
    report,
    stacked_lora,
    training,
)

SUITES = {
    "multi_adapter": (
        multi_adapter,
        ["--concurrency", "1", "2", "--max-tokens", "3", "--repeats", "1", "--prompt-tokens", "8"],
    ),
    "naive": (
        naive,
        ["--concurrency", "2", "--requests", "3", "--adapters", "2", "--max-tokens", "3", "--repeats", "1"],
    ),
    "head_of_line": (
        head_of_line,
        ["--long", "2", "--long-tokens", "12", "--short-tokens", "2", "--arrival-s", "0", "--repeats", "1"],
    ),
    "adapter_scale": (adapter_scale, ["--sizes", "1", "3", "--loads", "2", "--list-calls", "5"]),
    "decode_roofline": (
        decode_roofline,
        ["--batches", "2", "--max-tokens", "8", "--copy-mb", "8", "--repeats", "1"],
    ),
    "stacked_lora": (
        stacked_lora,
        ["--batches", "1", "4", "--adapters", "1", "3", "--iters", "2", "--repeats", "1"],
    ),
    # Both workers: this tree as current and as baseline (HEAD, which a shallow clone has too).
    "paged_kv": (
        paged_kv,
        [
            *("--baseline-ref", "HEAD", "--prefix-tokens", "40", "--suffix-tokens", "4", "--pairs", "1"),
            *("--capacity-requests", "4", "--capacity-prompt-tokens", "20", "--capacity-max-tokens", "2"),
            *("--capacity-repeats", "1", "--concurrency", "2", "--max-tokens", "3", "--adapters", "2"),
            *("--repeats", "1", "--burst", "2", "--burst-prompt-tokens", "20", "40"),
            *("--burst-max-tokens", "2"),
        ],
    ),
    # the tokenizer only; outlines-core's JSON-object compile alone takes tens of seconds
    "grammar": (grammar, ["--libraries", "xgrammar", "llguidance", "--repeats", "1"]),
}


@pytest.fixture(scope="module")
def adapter_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-adapters")


@pytest.mark.parametrize("suite", list(SUITES))
def test_suite_runs_on_tiny_model_and_reports(suite, tiny_base_dir, adapter_cache, tmp_path):
    module, argv = SUITES[suite]
    out = tmp_path / suite
    args = module.parse_args([*argv, "--out", str(out), "--adapter-cache", str(adapter_cache)])
    result = module.run(args, tiny=tiny_base_dir)
    assert result.suite == suite
    assert result.headline
    assert all(math.isfinite(h["value"]) and h["value"] > 0 for h in result.headline), result.headline
    record.write_result(result, out, module.details(result))
    module._plot(result, out)
    saved = json.loads((out / "result.json").read_text())
    assert saved["headline"] == result.headline
    assert saved["machine"]["threads"] == args.threads
    assert list(out.glob("*.png"))
    assert "Command:" in (out / "table.md").read_text()
    gpu = dataclasses.replace(result, machine=dataclasses.replace(result.machine, device="cuda"))
    record.write_result(gpu, record.results_folder(suite, "cuda", tmp_path), "")
    text = report.build(tmp_path)
    assert f"### {suite}" in text
    assert text.index("## CPU") < text.index("## GPU")  # a GPU run lands beside the CPU one
    assert result.headline[0]["name"] in text
    readme = f"intro\n{report.SUMMARY_START}\nstale\n{report.SUMMARY_END}\nrest\n"
    replaced = report.replace_summary(readme, report.summary(tmp_path))
    assert result.headline[0]["name"] in replaced and result.command in replaced
    assert "stale" not in replaced and replaced.startswith("intro\n") and replaced.endswith("rest\n")


@pytest.mark.parametrize("variant", ["train_job", "plain", "train_job_packed"])
def test_training_worker_counts_tokens_on_tiny_model(variant, tiny_base_dir):
    """The training suite's worker (run in a subprocess by the suite) trains and reports its counts."""
    args = training.parse_args(
        ["--worker", variant, "--steps", "1", "--batch-size", "2", "--base", str(tiny_base_dir)]
    )
    row = training.worker(args)
    assert row["variant"] == variant
    assert row["steps"] == 1
    assert row["tokens"] > 0
    assert row["tokens_per_s"] > 0
    assert 0 < row["useful_tokens_per_s"] < row["tokens_per_s"]  # the prompt is not in the loss
    assert row["peak_rss_bytes"] > row["model_bytes"] > 0
