"""The vllm_cpu suite's bookkeeping: scenarios, long prompts on the real tokenizer, paired ratios and the
report; no vLLM needed (the suite itself needs vllm-cpu in its own venv)."""

from __future__ import annotations

import math

import pytest

from bench import op_profile, report, vllm_cpu
from bench.record import MachineInfo, SuiteResult, write_result


def test_every_row_of_the_issue_is_a_scenario_in_both_sizes():
    for quick in (True, False):
        keys = [s.key for s in vllm_cpu.scenarios(quick)]
        assert keys == [
            "batch1",
            "mixed16",
            "mixed64",
            "mixed64_ttft",
            "base16",
            "shared_prefix",
            "unique_prompt",
        ]
    full = {s.key: s for s in vllm_cpu.scenarios(False)}
    assert full["batch1"].max_tokens == 128 and full["batch1"].concurrency == 1
    assert full["mixed64"].concurrency == 64 and full["mixed64"].adapters
    assert not vllm_cpu.higher_is_better(full["unique_prompt"].metric)


def test_long_prompts_have_the_asked_length_and_share_only_what_they_should(real_tokenizer):
    def encode(text):
        return real_tokenizer.encode(text, add_special_tokens=False)

    unique = vllm_cpu.prompt_lines("unique", 3, 0, encode, real_tokenizer.decode, 120)
    assert all(abs(len(encode(p)) - 120) <= 2 for p in unique)  # a decode/encode round trip may merge
    assert len({p.split()[0] for p in unique}) == 3 or len({p[:20] for p in unique}) == 3
    again = vllm_cpu.prompt_lines("unique", 3, 1, encode, real_tokenizer.decode, 120)
    assert not set(unique) & set(again)  # a second repeat never finds a cached prompt
    shared = vllm_cpu.prompt_lines("shared", 3, 0, encode, real_tokenizer.decode, 120)
    prefix = shared[0].split("\n\nQuestion")[0]
    assert all(p.startswith(prefix) for p in shared) and len(set(shared)) == 3


def test_scenario_filter_and_defaults():
    args = vllm_cpu.parse_args(["--quick", "--scenario", "batch1", "unique_prompt"])
    assert [s.key for s in args.scenarios] == ["batch1", "unique_prompt"]
    assert [p.key for p in args.pairs] == ["float32:float32"] and args.repeats == 1
    assert [p.key for p in vllm_cpu.parse_args([]).pairs] == ["float32:float32", "bfloat16:bfloat16"]
    defaults = vllm_cpu.parse_args(["--pairs", "float32:bfloat16"]).pairs
    assert defaults == [vllm_cpu.DtypePair("float32", "bfloat16")]
    assert defaults[0].label() == "ours (float32) / vLLM (bfloat16)"
    with pytest.raises(SystemExit):
        vllm_cpu.parse_args(["--scenario", "nope"])


@pytest.mark.parametrize("text", ["float32", "float16:float32", "bfloat16:", ":float32"])
def test_a_malformed_pair_is_refused_naming_it(text, capsys):
    with pytest.raises(SystemExit) as exited:
        vllm_cpu.parse_args(["--pairs", text])
    assert exited.value.code == 2
    assert repr(text) in capsys.readouterr().err


def test_missing_vllm_python_exits_2_with_build_instructions(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        vllm_cpu._check_vllm_python(tmp_path / "no-such-python")
    assert exited.value.code == 2
    assert "make install-vllm" in capsys.readouterr().err


def test_headlines_details_plot_and_report_from_rows(tmp_path):
    args = vllm_cpu.parse_args(["--repeats", "2"])
    rows = []
    for pair in args.pairs:
        for repeat in range(2):
            for s in args.scenarios:
                for server in vllm_cpu.SERVERS:
                    ours = server == vllm_cpu.OURS
                    rows.append(
                        {
                            "repeat": repeat, "scenario": s.key, "server": server, "pair": pair.key,
                            "tokens_per_s": 30.0 if ours else 20.0, "ttft_p50_ms": 100.0 if ours else 200.0,
                            "completed": 4, "errors": 0, "finished_by_length": 4,
                        }
                    )  # fmt: skip
    result = SuiteResult(
        suite="vllm_cpu",
        command="python -m bench.vllm_cpu",
        machine=MachineInfo.current("cpu"),
        config={
            "vllm_cpu": "0.0.0",
            "pairs": [pair.key for pair in args.pairs],
            "ours_args": [],
            "scenarios": [s.__dict__ for s in args.scenarios],
            "greedy_probe": {"identical": 10, "of": 10, "max_tokens": 16},
            "profiled": ["base16"],
        },
        rows=rows,
    )
    for pair in args.pairs:  # --profile base16: each server's category times, as the suite records them
        for server, gemm in ((vllm_cpu.OURS, 3.0), (vllm_cpu.VLLM, 1.0)):
            seconds = {op_profile.GEMM: gemm, op_profile.OVERHEAD: 1.0}
            op_profile.add_profile(result, vllm_cpu.profile_variant(pair.key, "base16", server), seconds)
    vllm_cpu.add_headlines(result, args.pairs, args.scenarios)
    assert len(result.headline) == 2 * len(args.scenarios)
    by_name = {h["name"]: h for h in result.headline}
    tps = by_name["ours (float32) / vLLM (float32): batch-1 decode tok/s"]
    ttft = by_name["ours (bfloat16) / vLLM (bfloat16): unique 700-token prompt, TTFT p50"]
    assert tps["value"] == pytest.approx(1.5) and tps["met"]
    assert ttft["value"] == pytest.approx(0.5) and ttft["met"] and ttft["goal"] == "<= 1"
    assert all(math.isfinite(h["value"]) for h in result.headline)
    out = tmp_path / "vllm_cpu"
    write_result(result, out, vllm_cpu.details(result))
    vllm_cpu._plot(result, out)
    table = (out / "table.md").read_text()
    assert "10 of 10 outputs identical" in table
    assert "base16, dtypes ours:vLLM bfloat16:bfloat16" in table
    assert (
        "| GEMM (base and LoRA matmuls) | 75% (3.00 s) | 50% (1.00 s) |" in table
    )  # ours, vLLM side by side
    assert (out / "vllm_cpu.png").is_file()
    assert "### vllm_cpu" in report.build(tmp_path)


def test_the_c64_rows_read_one_run_and_no_other_rows_share_one():
    for quick in (True, False):
        by_workload: dict[tuple, list[str]] = {}
        for s in vllm_cpu.scenarios(quick):
            by_workload.setdefault(s.workload(), []).append(s.key)
        assert sorted(by_workload.values()) == sorted(
            [
                ["batch1"],
                ["mixed16"],
                ["mixed64", "mixed64_ttft"],
                ["base16"],
                ["shared_prefix"],
                ["unique_prompt"],
            ]
        )


def test_a_long_prompt_row_that_sent_short_prompts_fails():
    vllm_cpu.check_prompt_lengths([{"prompt_tokens": 701}, {"prompt_tokens": 699}], 700)
    with pytest.raises(RuntimeError, match="counted 12 prompt tokens, not ~700"):
        vllm_cpu.check_prompt_lengths([{"prompt_tokens": 701}, {"prompt_tokens": 12}], 700)
    with pytest.raises(RuntimeError, match="no server usage"):
        vllm_cpu.check_prompt_lengths([{"prompt_tokens": None}], 700)


def test_a_profiled_run_is_one_short_wave():
    full = {s.key: s for s in vllm_cpu.scenarios(False)}
    base16 = vllm_cpu.profiled_run(full["base16"])
    assert (base16.requests, base16.max_tokens) == (16, vllm_cpu.PROFILE_TOKENS)
    unique = vllm_cpu.profiled_run(full["unique_prompt"])
    assert (unique.requests, unique.max_tokens, unique.prompts) == (1, 4, "unique")
