"""The GPU run's plan, checked where it is written: every suite step's flags parse, every test path
exists, and the bases it builds have the shapes it names (the run itself needs the GPU machine)."""

from __future__ import annotations

import importlib
import tarfile
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench import gpu_run
from lorayard.testing.random_base import LLAMA_8B, TINY, build_random_base

REPO = Path(__file__).resolve().parents[3]


def test_every_suite_step_parses_with_its_suite_and_writes_its_own_folder(tmp_path):
    plan = gpu_run.steps(tmp_path)
    suites = [s for s in plan if s.suite_out]
    assert {s.suite_out for s in suites} >= {
        "decode_roofline",
        "decode_roofline_8b",
        "multi_adapter",
        "naive",
        "stacked_lora",
    }
    assert len({s.suite_out for s in suites}) == len(suites)
    for step in suites:
        module = importlib.import_module(step.argv[0])
        args = module.parse_args(list(step.argv[1:]))
        assert args.device == "cuda"
        assert args.out == tmp_path / "results" / step.suite_out


def test_every_test_step_names_files_that_exist(tmp_path):
    for step in gpu_run.steps(tmp_path):
        if step.argv[0] == "pytest":
            paths = [a for a in step.argv if a.startswith("tests/")]
            assert paths and all((REPO / p).exists() for p in paths), step
    assert sum(s.timeout_s for s in gpu_run.steps(tmp_path)) < 30 * 60  # each bounded; --budget caps the sum


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path, capsys):
    assert gpu_run.main(["run", "--dry-run", "--work", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(gpu_run.steps(tmp_path))
    assert not (tmp_path / "out").exists()


def test_the_8b_shape_is_llama_3_8b(real_base):
    config = AutoConfig.from_pretrained(real_base.path)
    config.update(LLAMA_8B)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert 8.0e9 < sum(p.numel() for p in model.parameters()) < 8.1e9  # Llama-3-8B: 8.03e9


def test_a_random_base_is_saved_in_the_dtype_asked_for(real_base, tmp_path):
    out = build_random_base(real_base.path, tmp_path / "base", TINY, dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert (out / "tokenizer.json").is_file()


def test_only_reruns_the_named_steps_and_refuses_unknown_ones(tmp_path, capsys):
    work = ["--work", str(tmp_path), "--dry-run"]
    assert gpu_run.main(["run", *work, "--only", "build 8B base", "decode_roofline_8b"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    with pytest.raises(SystemExit, match="--only names unknown steps"):
        gpu_run.main(["run", *work, "--only", "no such step"])


def test_a_step_runs_for_real_and_the_three_files_come_back(real_base, tmp_path):
    """The run itself, on the CPU: the 135M base's build step (bf16; ~10 s, the one test of how the run
    starts its steps, records them and packs what comes back), the summary and archives."""
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["run", "--device", "cpu", "--like", str(real_base.path), "--work", str(work), "--out", str(out)]
    assert gpu_run.main([*argv, "--only", "build 135M base"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.tar.gz", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "| build 135M base | ok |" in summary
    built = AutoConfig.from_pretrained(work / "bases" / "smollm2-135m-random")
    assert built.hidden_size == AutoConfig.from_pretrained(real_base.path).hidden_size
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "logs/build_135M_base.log" in tar.getnames()
