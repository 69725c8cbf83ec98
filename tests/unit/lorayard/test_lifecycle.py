"""Promote, canary, roll back and the history file on a local volume; the canary routing function."""

import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from lorayard.storage import IntegrityError
from lorayard.volume import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    HISTORY_FILE,
    LATEST_FILE,
    ROUTING_FILE,
    AdapterNotFound,
    AdapterVolume,
    BaseModelRef,
    LifecycleError,
    Manifest,
    Route,
    Routing,
)


def publish(volume: AdapterVolume, name: str, payload: str) -> int:
    with volume.staging(name) as staged:
        (staged / ADAPTER_CONFIG_FILE).write_text('{"r": 8, "lora_alpha": 16}')
        (staged / ADAPTER_WEIGHTS_FILE).write_text(payload)
        manifest = Manifest(name=name, version=0, base_model=BaseModelRef(id="tiny", sha256="0" * 64))
        return volume.publish(staged, manifest).version


@pytest.fixture
def volume(adapters_dir) -> AdapterVolume:
    volume = AdapterVolume(adapters_dir)
    for i in range(3):
        publish(volume, "support", f"weights-{i}")
    return volume


def test_the_manifest_lists_every_file_and_verify_catches_a_changed_one(volume):
    adapter = volume.resolve("support@v2")
    files = adapter.manifest().files
    assert set(files) == {ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE}
    assert files[ADAPTER_WEIGHTS_FILE].size == len("weights-1")
    adapter.verify()
    (adapter.path / ADAPTER_WEIGHTS_FILE).write_text("weights-X")  # same size, other bytes
    with pytest.raises(IntegrityError, match="sha256"):
        adapter.verify()
    (adapter.path / ADAPTER_WEIGHTS_FILE).write_text("short")
    with pytest.raises(IntegrityError, match="5 bytes"):
        adapter.verify()


def test_promote_and_rollback_move_latest_and_are_recorded(volume, adapters_dir):
    assert volume.latest("support") == 3
    volume.promote("support", 1, reason="v2 and v3 regress on refunds")
    assert (adapters_dir / "support" / LATEST_FILE).read_text().strip() == "v1"
    assert volume.resolve("support").version == 1
    assert volume.resolve("support@v3").version == 3  # a pin still pins

    back = volume.rollback("support")
    assert (back.from_version, back.to) == ("v1", "v3")
    assert volume.latest("support") == 3
    # The next rollback undoes the publish before: v3 -> v2, then v2 -> v1; then nothing is left.
    assert volume.rollback("support").to == "v2"
    assert volume.rollback("support").to == "v1"
    with pytest.raises(LifecycleError, match="first version"):
        volume.rollback("support")
    assert volume.latest("support") == 1

    lines = (adapters_dir / "support" / HISTORY_FILE).read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["action"] for e in entries] == ["publish"] * 3 + ["promote"] + ["rollback"] * 3
    assert entries[3] == {**entries[3], "from": "v3", "to": "v1", "reason": "v2 and v3 regress on refunds"}
    assert all(e["at"].endswith("+00:00") for e in entries)
    assert entries[0]["to"] == "v1" and "from" not in entries[0]


def test_promote_refuses_a_version_that_does_not_exist(volume, adapters_dir):
    with pytest.raises(AdapterNotFound, match="v9"):
        volume.promote("support", 9)
    assert volume.latest("support") == 3
    assert len(volume.history("support")) == 3


def test_canary_splits_until_a_promote_and_a_rollback_removes_it(volume, adapters_dir):
    volume.promote("support", 2)
    routing = volume.canary("support", 3, 10, reason="try v3")
    assert [(r.version, r.weight) for r in routing.routes] == [("v2", 90), ("v3", 10)]
    assert json.loads((adapters_dir / "support" / ROUTING_FILE).read_text())["base"] == "v2"
    assert volume.pointers("support").routing == routing
    assert volume.latest("support") == 2  # LATEST stays until the canary is promoted

    volume.rollback("support")  # undoes the canary, not the promote
    assert not (adapters_dir / "support" / ROUTING_FILE).exists() and volume.latest("support") == 2

    volume.canary("support", 3, 10)
    volume.promote("support", 3)  # a plain promote ends the split
    assert volume.pointers("support").routing is None and volume.latest("support") == 3
    with pytest.raises(LifecycleError, match="LATEST already"):
        volume.canary("support", 3, 10)
    with pytest.raises(LifecycleError, match="between 0 and 100"):
        volume.canary("support", 1, 100)


def test_a_split_written_against_another_latest_is_ignored(volume, adapters_dir):
    volume.canary("support", 1, 50)
    # Another writer moves LATEST without touching the routing file: the split no longer applies.
    (adapters_dir / "support" / LATEST_FILE).write_text("v2\n")
    assert volume.pointers("support").routing is None
    assert {volume.resolve("support", user=f"u{i}").version for i in range(50)} == {2}


def test_a_publish_ends_a_split(volume):
    volume.canary("support", 1, 50)
    publish(volume, "support", "weights-3")
    assert volume.pointers("support").routing is None and volume.latest("support") == 4


def _split(percent: float) -> Routing:
    return Routing(
        base="v1", routes=[Route(version="v1", weight=100 - percent), Route(version="v2", weight=percent)]
    )


def test_routing_sends_the_canary_share_and_a_user_keeps_their_version():
    routing = _split(20)
    users = [f"user-{i}" for i in range(2000)]
    picks = {user: routing.pick("support", user) for user in users}
    share = sum(v == 2 for v in picks.values()) / len(users)
    assert 0.17 < share < 0.23, share
    assert all(routing.pick("support", user) == picks[user] for user in users[:200])  # sticky
    anonymous = [routing.pick("support", None) for _ in range(2000)]
    assert 0.17 < anonymous.count(2) / len(anonymous) < 0.23
    # Raising the canary's share only moves users onto it; nobody on it goes back.
    wider = _split(40)
    assert all(wider.pick("support", u) == 2 for u, v in picks.items() if v == 2)


def test_routing_weights_must_sum_to_100():
    with pytest.raises(ValueError, match="sum to 90"):
        Routing(base="v1", routes=[Route(version="v1", weight=80), Route(version="v2", weight=10)])


# -- races: every change is one conditional append to the history; LATEST follows it ------------------


@pytest.fixture(params=["folder", "s3"])
def any_volume(request, adapters_dir, tmp_path) -> AdapterVolume:
    """An empty volume on a folder, then on a bucket of moto's S3 server."""
    if request.param == "folder":
        return AdapterVolume(adapters_dir)
    return AdapterVolume(request.getfixturevalue("s3_bucket"), cache_dir=tmp_path / "cache")


def assert_linear(volume: AdapterVolume, name: str) -> None:
    """Each LATEST move starts where the one before ended: no change was planned on a stale state."""
    latest = None
    for entry in volume.history(name):
        if entry.action != "canary":
            assert entry.from_version == latest, volume.history(name)
            latest = entry.to
    assert f"v{volume.latest(name)}" == latest  # and LATEST says where the history ended


def rollbacks_to_the_start(volume: AdapterVolume, name: str) -> list[int]:
    """Roll back until refused; the versions LATEST went to."""
    walked = []
    while True:
        try:
            walked.append(volume.rollback(name).to)
        except LifecycleError:
            return [int(v.removeprefix("v")) for v in walked]


def test_concurrent_rollbacks_each_undo_one_change_and_the_history_stays_linear(any_volume):
    for i in range(5):
        publish(any_volume, "support", f"w{i}")
    barrier = threading.Barrier(3)
    done: list[str] = []

    def operator() -> None:
        barrier.wait()
        done.append(any_volume.rollback("support").to)

    threads = [threading.Thread(target=operator) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Each was planned on the history the one before left: v5 -> v4 -> v3 -> v2, never twice v5 -> v4.
    assert sorted(done) == ["v2", "v3", "v4"]
    assert any_volume.latest("support") == 2
    assert_linear(any_volume, "support")
    assert rollbacks_to_the_start(any_volume, "support") == [1]  # the next legitimate one still works


def test_concurrent_promotes_and_publishers_keep_one_linear_history(any_volume):
    for i in range(3):
        publish(any_volume, "support", f"w{i}")
    barrier = threading.Barrier(4)

    def promoter(version: int) -> None:
        barrier.wait()
        any_volume.promote("support", version)

    def publisher(i: int) -> None:
        barrier.wait()
        publish(any_volume, "support", f"late-{i}")

    threads = [threading.Thread(target=promoter, args=(v,)) for v in (1, 2)]
    threads += [threading.Thread(target=publisher, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert_linear(any_volume, "support")
    assert any_volume.versions("support") == [1, 2, 3, 4, 5]


def test_a_version_left_without_a_history_line_is_adopted_so_rollback_never_skips_it(any_volume):
    """What an earlier lorayard killed between writing LATEST and its history line left behind."""
    for i in range(3):
        publish(any_volume, "support", f"w{i}")
    storage = any_volume.storage
    lines = storage.read_text(f"support/{HISTORY_FILE}").splitlines(keepends=True)
    storage.write_text(f"support/{HISTORY_FILE}", "".join(lines[:2]))  # v3's line never written
    assert any_volume.latest("support") == 3  # LATEST says v3 and serves it

    back = any_volume.rollback("support")
    assert (back.from_version, back.to) == ("v3", "v2")  # not v3 -> v1
    adopted = any_volume.history("support")[2]
    assert (adopted.action, adopted.from_version, adopted.to) == ("publish", "v2", "v3")
    assert adopted.reason.startswith("recorded late")
    assert_linear(any_volume, "support")
    assert rollbacks_to_the_start(any_volume, "support") == [1]


def test_duplicate_rollbacks_recorded_before_undo_only_once(any_volume):
    """Two rollbacks at once used to both record v3 -> v2; the next rollback was then refused."""
    for i in range(3):
        publish(any_volume, "support", f"w{i}")
    any_volume.rollback("support")
    storage = any_volume.storage
    history = storage.read_text(f"support/{HISTORY_FILE}")
    storage.write_text(f"support/{HISTORY_FILE}", history + history.splitlines(keepends=True)[-1])
    assert [(e.from_version, e.to) for e in any_volume.history("support")[-2:]] == [("v3", "v2")] * 2

    assert rollbacks_to_the_start(any_volume, "support") == [1]  # v2 -> v1, then nothing before v1


def test_a_line_whose_latest_was_never_written_is_followed_by_the_next_change(any_volume):
    """A change killed after its history line, before LATEST: the history is what happened."""
    for i in range(3):
        publish(any_volume, "support", f"w{i}")
    storage = any_volume.storage
    history = storage.read_text(f"support/{HISTORY_FILE}")
    promote = '{"action": "promote", "from": "v3", "to": "v1", "at": "2026-12-06T08:00:00+00:00"}\n'
    storage.write_text(f"support/{HISTORY_FILE}", history + promote)
    assert any_volume.latest("support") == 3  # still behind its history

    back = any_volume.rollback("support")  # undoes that promote
    assert (back.from_version, back.to) == ("v1", "v3")
    assert storage.read_text(f"support/{LATEST_FILE}") == "v3\n"
    assert_linear(any_volume, "support")


_PUBLISH_FOREVER = """
import sys
from lorayard.volume import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterVolume, BaseModelRef, Manifest

volume = AdapterVolume(sys.argv[1], cache_dir=sys.argv[2])
for i in range(10**6):
    with volume.staging("support") as staged:
        (staged / ADAPTER_CONFIG_FILE).write_text('{"r": 8, "lora_alpha": 16}')
        (staged / ADAPTER_WEIGHTS_FILE).write_text(f"killed-{i}")
        manifest = Manifest(name="support", version=0, base_model=BaseModelRef(id="tiny", sha256="0" * 64))
        volume.publish(staged, manifest)
    print(i, flush=True)
"""


def test_publishers_killed_at_random_points_never_leave_a_version_that_rollback_skips(any_volume, tmp_path):
    """SIGKILL a publisher that publishes in a loop, at a random moment of a random publish; 4 times."""
    rng = random.Random(1206)
    publish(any_volume, "support", "w0")
    for _run in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", _PUBLISH_FOREVER, any_volume.location, str(tmp_path / "child-cache")],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        try:
            ready, _, _ = select.select([child.stdout], [], [], 60)
            assert ready and child.stdout.readline(), "the publisher never finished a first publish"
            time.sleep(rng.uniform(0, 0.4))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
    assert_served_and_recorded_agree(any_volume, "support")
    # A kill between a version's commit and its history line leaves it unrecorded; the next publish
    # records it, in order, so every committed version is one rollback step.
    top = publish(any_volume, "support", "final")
    versions = any_volume.versions("support")
    assert versions[-1] == top and any_volume.latest("support") == top
    assert_linear(any_volume, "support")
    assert rollbacks_to_the_start(any_volume, "support") == versions[-2::-1]


def assert_served_and_recorded_agree(volume: AdapterVolume, name: str) -> None:
    """What a kill leaves: LATEST names a version the history made LATEST (it may lag the last line,
    killed before writing it; it never leads it), and the next change writes it from the history."""
    timeline = volume.timeline(name)
    assert volume.latest(name) in timeline.recorded
    volume.promote(name, timeline.latest)
    assert volume.latest(name) == timeline.latest
    assert volume.history(name)[-1].reason is None  # nothing adopted "late"
    volume.rollback(name)  # undo that promote again
    assert volume.latest(name) == timeline.latest
