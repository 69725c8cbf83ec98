"""``python -m lorayard.train promote | rollback | history`` on a local volume, as a pipeline runs them."""

import json
import os
import subprocess
import sys

from lorayard.volume import AdapterVolume
from tests.unit.lorayard.test_lifecycle import publish

REPO_ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def train_job(*args: str, adapters_dir=None) -> subprocess.CompletedProcess:
    env = REPO_ENV if adapters_dir is None else {**REPO_ENV, "LORAYARD_ADAPTERS_DIR": str(adapters_dir)}
    return subprocess.run(
        [sys.executable, "-m", "lorayard.train", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_promote_canary_rollback_and_history_from_the_command_line(adapters_dir):
    volume = AdapterVolume(adapters_dir)
    for i in range(2):
        publish(volume, "support", f"w{i}")
    done = train_job("promote", "support", "v1", "--adapters-dir", str(adapters_dir), "--reason", "hotfix")
    assert done.returncode == 0, done.stderr
    assert "LATEST v2 -> v1" in done.stdout and volume.latest("support") == 1

    done = train_job("promote", "support", "v2", "--canary", "10", adapters_dir=adapters_dir)  # env var
    assert done.returncode == 0 and "90% v1, 10% v2" in done.stdout
    assert volume.pointers("support").routing is not None

    assert train_job("rollback", "support", adapters_dir=adapters_dir).returncode == 0  # the canary
    assert volume.pointers("support").routing is None and volume.latest("support") == 1
    assert train_job("rollback", "support", adapters_dir=adapters_dir).returncode == 0  # the promote
    assert volume.latest("support") == 2

    history = train_job("history", "support", adapters_dir=adapters_dir)
    actions = [json.loads(line)["action"] for line in history.stdout.splitlines()]
    assert actions == ["publish", "publish", "promote", "canary", "rollback", "rollback"]


def test_refusals_exit_6_and_change_nothing(adapters_dir):
    volume = AdapterVolume(adapters_dir)
    publish(volume, "support", "w0")
    missing = train_job("promote", "support", "v7", "--adapters-dir", str(adapters_dir))
    assert missing.returncode == 6 and "support@v7 not found" in missing.stderr
    first = train_job("rollback", "support", "--adapters-dir", str(adapters_dir))
    assert first.returncode == 6 and "first version" in first.stderr
    bad = train_job("promote", "support", "seven", "--adapters-dir", str(adapters_dir))
    assert bad.returncode == 6 and "invalid version" in bad.stderr
    assert volume.latest("support") == 1 and len(volume.history("support")) == 1


def test_two_rollbacks_at_once_from_the_command_line_undo_two_changes_in_turn(adapters_dir):
    volume = AdapterVolume(adapters_dir)
    for i in range(4):
        publish(volume, "support", f"w{i}")
    env = {**REPO_ENV, "LORAYARD_ADAPTERS_DIR": str(adapters_dir)}
    operators = [
        subprocess.Popen(
            [sys.executable, "-m", "lorayard.train", "rollback", "support"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [operator.communicate(timeout=60) for operator in operators]
    assert [operator.returncode for operator in operators] == [0, 0], outputs
    moves = sorted(out.split("(")[0].strip() for out, _ in outputs)
    assert moves == ["support: LATEST v3 -> v2", "support: LATEST v4 -> v3"]  # never v4 -> v3 twice
    assert volume.latest("support") == 2
    rollbacks = [(e.from_version, e.to) for e in volume.history("support") if e.action == "rollback"]
    assert rollbacks == [("v4", "v3"), ("v3", "v2")]
    assert train_job("rollback", "support", adapters_dir=adapters_dir).returncode == 0  # v2 -> v1
    assert volume.latest("support") == 1
