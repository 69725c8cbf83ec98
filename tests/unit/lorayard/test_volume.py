import os
import threading
from pathlib import Path

import pytest

from lorayard.volume import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterNotFound,
    AdapterRef,
    AdapterVolume,
    BaseModelRef,
    InvalidAdapterName,
    Manifest,
)


def _stage(volume: AdapterVolume, name: str, payload: str):
    ctx = volume.staging(name)
    folder = ctx.__enter__()
    (folder / ADAPTER_CONFIG_FILE).write_text('{"r": 8, "lora_alpha": 16}')
    (folder / ADAPTER_WEIGHTS_FILE).write_text(payload)
    return ctx, folder


def _manifest(name: str) -> Manifest:
    return Manifest(name=name, version=0, base_model=BaseModelRef(id="tiny", sha256="0" * 64))


def test_publish_is_versioned_and_latest_follows(adapters_dir):
    volume = AdapterVolume(adapters_dir)
    for i in range(3):
        ctx, staged = _stage(volume, "support", f"w{i}")
        published = volume.publish(staged, _manifest("support"))
        ctx.__exit__(None, None, None)
        assert published.version == i + 1
    assert volume.versions("support") == [1, 2, 3]
    assert (adapters_dir / "support" / "LATEST").read_text().strip() == "v3"
    assert volume.resolve("support").version == 3
    assert volume.resolve("support@v1").path.name == "v1"
    assert (volume.resolve("support@v2").path / ADAPTER_WEIGHTS_FILE).read_text() == "w1"
    assert volume.resolve("support").manifest().version == 3
    assert not any((adapters_dir / ".staging").iterdir())


def test_concurrent_publishers_get_distinct_versions(adapters_dir):
    volume = AdapterVolume(adapters_dir)
    staged = [_stage(volume, "race", f"payload-{i}") for i in range(8)]
    barrier = threading.Barrier(len(staged))
    results = []

    def publish(folder: Path) -> None:
        barrier.wait()
        results.append(volume.publish(folder, _manifest("race")).version)

    threads = [threading.Thread(target=publish, args=(folder,)) for _, folder in staged]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(1, 9))
    payloads = {(adapters_dir / "race" / f"v{v}" / ADAPTER_WEIGHTS_FILE).read_text() for v in results}
    assert payloads == {f"payload-{i}" for i in range(8)}
    assert volume.latest("race") == 8


@pytest.mark.parametrize(
    "bad", ["../etc", "a/b", "..", ".hidden", "", "x" * 65, "a..b", "/abs", "name@v0", "n@x"]
)
def test_bad_names_are_refused(bad):
    with pytest.raises(InvalidAdapterName):
        AdapterRef.parse(bad)


def test_symlink_leaving_the_volume_is_refused(adapters_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ADAPTER_CONFIG_FILE).write_text("{}")
    os.symlink(outside, adapters_dir / "evil")
    with pytest.raises(InvalidAdapterName, match="outside"):
        AdapterVolume(adapters_dir).resolve("evil")


def test_plain_peft_folder_and_missing(adapters_dir):
    plain = adapters_dir / "plain"
    plain.mkdir()
    (plain / ADAPTER_CONFIG_FILE).write_text("{}")
    volume = AdapterVolume(adapters_dir)
    assert volume.resolve("plain").version is None
    assert [a.name for a in volume.list()] == ["plain"]
    with pytest.raises(AdapterNotFound):
        volume.resolve("nope")
    with pytest.raises(AdapterNotFound):
        volume.resolve("plain@v2")
