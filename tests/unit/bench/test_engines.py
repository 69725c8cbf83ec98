"""The engines suite's bookkeeping: its rows, the two servers' flags (read by our own settings parser),
alternating order, paired ratios and the report; no vLLM needed (the suite itself needs .venv-vllm)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import engines, report
from bench.record import MachineInfo, SuiteResult, write_result
from lorayard.server.settings import parse_settings


def test_the_rows_of_the_issue_in_both_sizes():
    for quick in (True, False):
        keys = [s.key for s in engines.engine_scenarios(quick)]
        assert keys == ["batch1", "mixed16", "base16", "unique_prompt"]
    full = {s.key: s for s in engines.engine_scenarios(False)}
    assert full["batch1"].concurrency == 1 and not full["batch1"].adapters
    assert full["mixed16"].concurrency == 16 and full["mixed16"].adapters
    assert full["base16"].concurrency == 16 and not full["base16"].adapters
    assert full["unique_prompt"].prompts == "unique" and not engines.higher_is_better(
        full["unique_prompt"].metric
    )
    args = engines.parse_args(["--quick"])
    assert args.repeats == 1 and [s.key for s in args.scenarios] == keys
    assert engines.parse_args([]).repeats == 2


def test_order_alternates_so_neither_engine_always_leads():
    firsts = [engines.engine_order(repeat, index)[0] for repeat in range(2) for index in range(4)]
    assert firsts.count(engines.NATIVE) == firsts.count(engines.VLLM) == 4
    assert engines.engine_order(0, 0) != engines.engine_order(1, 0)


def test_both_servers_get_the_same_flags_but_the_engine(tmp_path):
    args = engines.parse_args(["--quick"])
    native, vllm = (engines.server_argv("python", e, tmp_path, args) for e in engines.ENGINES)
    # what `lorayard serve` makes of them (argv[0:3] is python -m lorayard.server)
    ours, theirs = parse_settings(native[3:]), parse_settings(vllm[3:])
    assert (ours.engine, theirs.engine) == ("native", "vllm")
    for field in ("adapters_dir", "device", "max_batch_size", "max_loaded_adapters"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert Path(theirs.adapters_dir) == tmp_path
    assert theirs.max_lora_rank >= max(spec.rank for spec in engines.ADAPTERS)


def test_missing_vllm_python_exits_with_the_install_command(tmp_path):
    with pytest.raises(SystemExit, match="make install-vllm"):
        engines.run(engines.parse_args(["--quick", "--vllm-python", str(tmp_path / "nope")]))


def test_headlines_details_plot_and_report_from_rows(tmp_path):
    args = engines.parse_args(["--repeats", "2"])
    rows = [
        {
            "repeat": repeat, "scenario": s.key, "engine": engine,
            "tokens_per_s": 30.0 if engine == engines.NATIVE else 20.0,
            "ttft_p50_ms": 100.0 if engine == engines.NATIVE else 200.0,
            "completed": 4, "errors": 0, "finished_by_length": 4,
        }
        for repeat in range(2)
        for s in args.scenarios
        for engine in engines.engine_order(repeat, 0)
    ]  # fmt: skip
    result = SuiteResult(
        suite="engines",
        command="python -m bench.engines",
        machine=MachineInfo.current("cpu"),
        config={
            "scenarios": [s.__dict__ for s in args.scenarios],
            "greedy_probe": {"identical": 10, "of": 10, "max_tokens": 16},
            "note": "a quick run on a loaded machine",
        },
        rows=rows,
    )
    engines.add_headlines(result, args.scenarios)
    by_name = {h["name"]: h for h in result.headline}
    assert len(by_name) == len(args.scenarios)
    tps = by_name["native / vllm engine: batch-1 decode tok/s"]
    ttft = by_name["native / vllm engine: unique 700-token prompt, TTFT p50"]
    assert tps["value"] == pytest.approx(1.5) and tps["met"]
    assert ttft["value"] == pytest.approx(0.5) and ttft["met"] and ttft["goal"] == "<= 1"
    assert all(math.isfinite(h["value"]) for h in result.headline)
    out = tmp_path / "engines"
    write_result(result, out, engines.details(result))
    engines.plot(result, out)
    table = (out / "table.md").read_text()
    assert "10 of 10 outputs identical" in table and "a quick run on a loaded machine" in table
    assert (out / "engines.png").is_file()
    assert "### engines" in report.build(tmp_path)
