"""The job as real processes: concurrent publishers, SIGKILL + --resume, SIGTERM, torchrun (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lorayard.train.__main__ import EXIT_TERMINATED
from lorayard.volume import AdapterVolume, read_manifest

from .conftest import REPO

LONG_RUN = ["--max-steps", "100000", "--eval-steps", "2", "--save-steps", "2"]


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, *, min_step: int, timeout: float = 90) -> int:
    """The step of the first complete checkpoint at or past ``min_step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        steps = [
            int(p.parent.name.removeprefix("checkpoint-"))
            for p in run_dir.glob("checkpoint-*/trainer_state.json")
        ]
        if steps and max(steps) >= min_step:
            return max(steps)
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint in {run_dir} after {timeout}s")


def test_concurrent_publishes_get_distinct_versions(tiny_args, adapters_dir, tmp_path, job_env):
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lorayard.train",
                *tiny_args,
                "--name",
                "race",
                "--max-steps",
                "2",
                "--output-dir",
                str(tmp_path / f"run{i}"),
                "--seed",
                str(i),
            ],
            cwd=REPO,
            env=job_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=180) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    volume = AdapterVolume(adapters_dir)
    assert volume.versions("race") == [1, 2]
    assert volume.latest("race") == 2
    assert sorted(read_manifest(volume.resolve(f"race@v{v}").path).config["seed"] for v in (1, 2)) == [0, 1]


def test_sigkill_publishes_nothing_and_resume_continues(tiny_args, adapters_dir, start_job, run_job):
    run_dir = adapters_dir / ".staging" / "runs" / "killed"
    proc = start_job([*tiny_args, "--name", "killed", *LONG_RUN])
    wait_for_checkpoint(run_dir, proc, min_step=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (adapters_dir / "killed").exists()

    resumed_from = max(
        int(p.parent.name.removeprefix("checkpoint-"))
        for p in run_dir.glob("checkpoint-*/trainer_state.json")
    )
    target = resumed_from + 3
    done = run_job([*tiny_args, "--name", "killed", *LONG_RUN[2:], "--max-steps", str(target), "--resume"])
    assert done.returncode == 0, done.stderr
    assert f"resuming from {run_dir / f'checkpoint-{resumed_from}'}" in done.stdout
    metrics = read_manifest(AdapterVolume(adapters_dir).resolve("killed").path).metrics
    assert metrics["resumed_from_step"] == resumed_from
    assert metrics["global_step"] == target  # the step count continued; it did not restart at 0


def test_sigterm_saves_a_checkpoint_and_exits_without_publishing(tiny_args, adapters_dir, start_job):
    run_dir = adapters_dir / ".staging" / "runs" / "preempted"
    proc = start_job([*tiny_args, "--name", "preempted", *LONG_RUN])
    before = wait_for_checkpoint(run_dir, proc, min_step=2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_TERMINATED, err
    assert "--resume" in err
    steps = [
        int(p.parent.name.removeprefix("checkpoint-"))
        for p in run_dir.glob("checkpoint-*/trainer_state.json")
    ]
    state = json.loads((run_dir / f"checkpoint-{max(steps)}" / "trainer_state.json").read_text())
    assert max(steps) > before and state["global_step"] == max(steps)  # saved where it stopped
    assert not (adapters_dir / "preempted").exists()


def test_torchrun_two_gloo_processes_publish_once(tiny_args, adapters_dir, job_env):
    env = {**job_env, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "lorayard.train", *tiny_args, "--name", "ddp", "--max-steps", "3",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    volume = AdapterVolume(adapters_dir)
    assert volume.versions("ddp") == [1]  # rank 0 only
    metrics = read_manifest(volume.resolve("ddp").path).metrics
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3
    assert done.stdout.count("published ddp@v1") == 1
    assert os.listdir(adapters_dir / ".staging") in ([], ["runs"])
