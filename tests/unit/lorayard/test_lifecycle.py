"""Promote, canary, roll back and the history file on a local volume; the canary routing function."""

import json

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
