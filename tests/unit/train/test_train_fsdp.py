"""FSDP across processes: two CPU processes (gloo) under torchrun train one adapter sharded, rank 0 alone
publishes it once, in exactly the single-process run's format; refusals name what to change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lorayard.adapter_files import load_adapter
from lorayard.train.__main__ import EXIT_CONFIG, main
from lorayard.train.config import ConfigError, load_config
from lorayard.volume import MANIFEST_FILE, AdapterVolume, read_manifest

from .conftest import REPO

WEIGHTS = "adapter_model.safetensors"
LONG_RUN = ["--max-steps", "100000", "--eval-steps", "2", "--save-steps", "2"]


def torchrun(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """``torchrun --standalone --nproc-per-node 2 -m lorayard.train ARGS`` on the CPU (gloo)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "lorayard.train", *args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the test can stop every rank it started
    )


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118  # safe_open is not a Mapping


def adapter_config(folder: Path) -> dict[str, object]:
    config = json.loads((folder / "adapter_config.json").read_text())
    return {**config, "target_modules": sorted(config["target_modules"])}


def test_fsdp_on_two_gloo_processes_publishes_once_in_the_single_process_format(
    tiny_args, adapters_dir, job_env, run_job, tiny_base_dir
):
    single = run_job([*tiny_args, "--name", "single", "--max-steps", "3"])
    assert single.returncode == 0, single.stderr[-3000:]
    proc = torchrun([*tiny_args, "--name", "sharded", "--max-steps", "3", "--fsdp"], job_env)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("every rank holds the same adapter") == 1  # sharded base, equal replicas: checked
    assert out.count("published sharded@v1") == 1  # rank 0 alone published

    volume = AdapterVolume(adapters_dir)
    assert volume.versions("sharded") == [1]
    one, fsdp = volume.resolve("single").path, volume.resolve("sharded").path
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in one.iterdir())
    # the same tensors: names, shapes, dtypes
    ours, theirs = tensors(one), tensors(fsdp)
    assert {k: (v.shape, v.dtype) for k, v in theirs.items()} == {
        k: (v.shape, v.dtype) for k, v in ours.items()
    }
    assert any(v.abs().sum() > 0 for k, v in theirs.items() if "lora_B" in k)  # trained, not the zero init
    # the same adapter config, field for field (PEFT keeps target_modules as a set: its order is a hash's)
    assert adapter_config(fsdp) == adapter_config(one)
    # the same manifest fields; the run says it was sharded over two processes
    single_manifest = json.loads((one / MANIFEST_FILE).read_text())
    fsdp_manifest = json.loads((fsdp / MANIFEST_FILE).read_text())
    assert fsdp_manifest.keys() == single_manifest.keys()
    assert fsdp_manifest["config"].keys() == single_manifest["config"].keys()
    assert fsdp_manifest["metrics"].keys() == single_manifest["metrics"].keys()
    manifest = read_manifest(fsdp)
    assert manifest.config["fsdp"] is True and manifest.metrics["world_size"] == 2
    assert manifest.metrics["global_step"] == 3
    # rank 0 evaluated its whole copy alone: the loss is the one the sharded run logged for those weights
    history = json.loads((fsdp / "eval.json").read_text())["loss_history"]
    logged = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert manifest.metrics["eval_loss"] == pytest.approx(min(logged), rel=1e-3)
    assert os.listdir(adapters_dir / ".staging") in ([], ["runs"])

    # the server's loader and PEFT both take it
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    load_adapter(fsdp, AutoConfig.from_pretrained(tiny_base_dir))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), str(fsdp))
    loaded = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(theirs)


def test_a_rank_killed_mid_run_publishes_nothing(tiny_args, adapters_dir, job_env):
    proc = torchrun([*tiny_args, "--name", "broken", "--fsdp", *LONG_RUN], job_env)
    try:
        rank1 = _worker_with_rank(proc.pid, 1, timeout=90)
        run_dir = adapters_dir / ".staging" / "runs" / "broken"
        deadline = time.monotonic() + 90
        while not list(run_dir.glob("checkpoint-*/trainer_state.json")):  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        os.kill(rank1, signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert not (adapters_dir / "broken").exists()


def _worker_with_rank(agent: int, rank: int, timeout: float) -> int:
    """The pid of torchrun's worker process whose environment says RANK=rank."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under {agent}")


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_fsdp_refuses_quantized_weights(tmp_path, bits):
    with pytest.raises(ConfigError, match="fsdp cannot shard quantized weights"):
        load_config(None, {"data": [tmp_path / "a.jsonl"], "fsdp": True, "quantization": bits})


@pytest.mark.parametrize("world_size", [None, "1"])
def test_fsdp_in_one_process_names_the_launcher(tiny_args, monkeypatch, capsys, world_size):
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)  # torchrun --nproc-per-node 1: nothing to shard across
    assert main([*tiny_args, "--fsdp"]) == EXIT_CONFIG
    assert "torchrun --nproc-per-node" in capsys.readouterr().err


def test_fsdp_refuses_resume(tiny_args, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*tiny_args, "--fsdp", "--resume"]) == EXIT_CONFIG
    assert "run without --resume" in capsys.readouterr().err


@pytest.mark.parametrize("fsdp", [[], ["--fsdp"]])
def test_accelerates_own_fsdp_is_refused(tiny_args, monkeypatch, capsys, fsdp):
    # `accelerate launch` with an FSDP config sets this; rank 0 could not evaluate that model alone
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*tiny_args, *fsdp]) == EXIT_CONFIG
    assert "pass --fsdp" in capsys.readouterr().err
