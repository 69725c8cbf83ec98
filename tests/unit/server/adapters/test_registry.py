"""The adapter registry on the tiny base: pinning and LRU, lora_path rules, replaced and broken files."""

import asyncio
import shutil

import pytest

from lorayard.server.adapters.registry import AdapterLoadError, AdapterRegistry, AdaptersBusy
from lorayard.testing.server import publish_folder
from lorayard.volume import AdapterNotFound, AdapterVolume, InvalidAdapterName


@pytest.fixture
def volume(adapters_dir, tiny_adapters, tiny_base) -> AdapterVolume:
    """qv4 published twice (v1, v2) and all8 once, through the volume contract."""
    volume = AdapterVolume(adapters_dir)
    for name, source in (("qv4", "qv4"), ("qv4", "all8"), ("all8", "all8")):
        publish_folder(volume, name, tiny_adapters / source, tiny_base.fingerprint, str(tiny_base.path))
    return volume


def _registry(volume, engine, tiny_base, max_loaded=2) -> AdapterRegistry:
    return AdapterRegistry(
        volume.root,
        engine,
        base_fingerprint=tiny_base.fingerprint,
        max_loaded=max_loaded,
        poll_interval_s=0.1,
    )


def test_pins_keep_adapters_resident_and_the_lru_evicts_only_idle_ones(volume, engine, tiny_base):
    async def scenario():
        registry = _registry(volume, engine, tiny_base)
        await registry.refresh()
        latest = await registry.acquire("qv4")
        assert (latest.key, latest.version) == ("qv4@v2", 2)
        pinned_v1 = await registry.acquire("qv4@v1")
        with pytest.raises(AdaptersBusy):
            await registry.acquire("all8")  # two slots, both pinned
        registry.release(latest)
        all8 = await registry.acquire("all8")  # evicts the idle qv4@v2, never the pinned v1
        assert {s.name: s.loaded for s in registry.list_models()} == {"all8": True, "qv4": True}
        again = await registry.acquire("qv4@v1")
        assert again.slot == pinned_v1.slot
        for lease in (pinned_v1, again, all8):
            registry.release(lease)
        await registry.unload("qv4")
        assert {s.name: s.loaded for s in registry.list_models()} == {"all8": True, "qv4": False}
        with pytest.raises(AdapterNotFound):
            await registry.acquire("missing")

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("path", "expected"),
    [("qv4", "qv4@v2"), ("qv4/v1", "qv4@v1"), ("{root}/qv4/v1", "qv4@v1"), ("{root}/qv4", "qv4@v2")],
)
def test_lora_path_is_on_the_volume_relative_or_absolute_and_may_pin_a_version(
    volume, engine, tiny_base, path, expected
):
    async def scenario():
        registry = _registry(volume, engine, tiny_base)
        await registry.refresh()
        status = await registry.load("qv4", path.format(root=volume.root))
        assert status.loaded
        assert [r.adapter.key for r in registry._resident.values()] == [expected]

    asyncio.run(scenario())


@pytest.mark.parametrize("path", ["/etc", "../outside", "all8", "qv4/v1/extra", "{root}/../qv4"])
def test_lora_path_outside_the_adapter_folder_is_refused(volume, engine, tiny_base, path):
    async def scenario():
        registry = _registry(volume, engine, tiny_base)
        await registry.refresh()
        with pytest.raises(InvalidAdapterName, match="lora_path"):
            await registry.load("qv4", path.format(root=volume.root))

    asyncio.run(scenario())


def test_broken_files_fail_that_adapter_only_and_it_recovers_once_fixed(
    volume, engine, tiny_base, tiny_adapters
):
    weights = volume.root / "all8" / "v1" / "adapter_model.safetensors"
    good = weights.read_bytes()

    async def scenario():
        registry = _registry(volume, engine, tiny_base)
        await registry.refresh()
        weights.write_bytes(good[: len(good) // 2])
        with pytest.raises(AdapterLoadError, match="all8@v1"):
            await registry.acquire("all8")
        assert {s.name: s.load_error is not None for s in registry.list_models()} == {
            "all8": True,
            "qv4": False,
        }
        registry.release(await registry.acquire("qv4"))
        weights.write_bytes(good)
        registry.release(await registry.acquire("all8"))
        assert all(s.load_error is None for s in registry.list_models())

    asyncio.run(scenario())


def test_a_folder_replaced_in_place_is_reloaded_and_running_requests_keep_the_old(
    adapters_dir, engine, tiny_base, tiny_adapters
):
    plain = adapters_dir / "plain"  # a plain PEFT folder, no versions: rewritten in place
    shutil.copytree(tiny_adapters / "qv4", plain)

    async def scenario():
        registry = _registry(AdapterVolume(adapters_dir), engine, tiny_base)
        await registry.refresh()
        running = await registry.acquire("plain")
        shutil.rmtree(plain)
        shutil.copytree(tiny_adapters / "all8", plain)
        fresh = await registry.acquire("plain")
        assert fresh.slot != running.slot  # new weights in a new slot; the old slot stays pinned
        assert running.slot in engine.runner.adapters
        registry.release(running)
        registry.release(fresh)

    asyncio.run(scenario())


def test_a_canary_routes_by_user_and_leases_pin_their_version_across_a_promote(volume, engine, tiny_base):
    volume.promote("qv4", 1)
    volume.canary("qv4", 2, 50)

    async def scenario():
        registry = _registry(volume, engine, tiny_base, max_loaded=3)
        await registry.refresh()
        picks = {}
        for i in range(12):
            lease = await registry.acquire("qv4", f"user-{i}")
            picks[f"user-{i}"] = lease.version
            registry.release(lease)
        assert set(picks.values()) == {1, 2}
        for user, version in picks.items():  # sticky
            lease = await registry.acquire("qv4", user)
            assert (lease.version, lease.key) == (version, f"qv4@v{version}")
            registry.release(lease)
        running = await registry.acquire("qv4@v1")
        volume.promote("qv4", 2)  # ends the split; the running request keeps v1
        assert {(await registry.acquire("qv4", u)).version for u in picks} == {2}
        assert running.slot in engine.runner.adapters and registry._resident[running.slot].pins == 1

    asyncio.run(scenario())


def test_a_file_changed_after_publish_fails_its_manifest_check(volume, engine, tiny_base):
    weights = volume.root / "all8" / "v1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit in the last tensor's payload: still a readable safetensors file

    async def scenario():
        registry = _registry(volume, engine, tiny_base)
        await registry.refresh()
        weights.write_bytes(bytes(data))
        with pytest.raises(AdapterLoadError, match="sha256"):
            await registry.acquire("all8")
        registry.release(await registry.acquire("qv4"))

    asyncio.run(scenario())


def test_a_cold_load_never_blocks_resident_adapters_and_one_version_loads_once(
    adapters_dir, engine, tiny_base, tiny_adapters, monkeypatch
):
    """Issue 24: the registry lock was held across a cold load. The slow adapter's config read (an
    instrumented file read: a slow disk, an object store) blocks until the test opens a gate;
    meanwhile a resident adapter is acquired at once, and two acquires of the slow one load it once."""
    import pathlib
    import threading

    shutil.copytree(tiny_adapters / "qv4", adapters_dir / "warm")
    shutil.copytree(tiny_adapters / "all8", adapters_dir / "slow")
    gate, reads = threading.Event(), []
    read_text = pathlib.Path.read_text

    def slow_read(path: pathlib.Path, *args, **kwargs) -> str:
        if path.parent.name == "slow" and path.name == "adapter_config.json":
            reads.append(path)
            assert gate.wait(timeout=30)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", slow_read)

    async def scenario():
        registry = _registry(AdapterVolume(adapters_dir), engine, tiny_base, max_loaded=3)
        await registry.refresh()
        registry.release(await registry.acquire("warm"))
        cold = [asyncio.create_task(registry.acquire("slow")) for _ in range(2)]
        await asyncio.sleep(0.3)
        assert reads and not any(task.done() for task in cold)  # the load is blocked in its read
        warm = await asyncio.wait_for(registry.acquire("warm"), timeout=2)
        registry.release(warm)
        gate.set()
        leases = await asyncio.wait_for(asyncio.gather(*cold), timeout=30)
        assert len(reads) == 1  # one load for both
        assert leases[0].slot == leases[1].slot
        for lease in leases:
            registry.release(lease)

    asyncio.run(scenario())
