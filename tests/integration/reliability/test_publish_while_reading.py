"""Property: a reader racing a publisher never sees a torn adapter version.

A thread publishes random small adapters (ranks, target modules) one after another while this thread
keeps doing what the server does: ``list()``, ``resolve()`` and ``load_adapter`` on what resolve
returned. Every version a reader sees must load completely and be exactly what was published under it.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from lorayard.adapter_files import TARGETABLE_MODULES, load_adapter
from lorayard.testing.random_adapter import build_random_adapter
from lorayard.volume import (
    AdapterNotFound,
    AdapterVolume,
    BaseModelRef,
    Manifest,
)

NAME = "racy"
SPEC = st.tuples(st.integers(1, 8), st.sets(st.sampled_from(TARGETABLE_MODULES), min_size=1, max_size=3))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(SPEC, min_size=1, max_size=5))
def test_reader_never_sees_a_torn_version(tiny_base_dir, specs):
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    config = model.config
    with tempfile.TemporaryDirectory() as tmp:
        volume = AdapterVolume(Path(tmp))
        published: dict[int, tuple[int, set[str]]] = {}
        failures: list[BaseException] = []

        def publisher() -> None:
            base = model
            try:
                for seed, (rank, modules) in enumerate(specs):
                    with volume.staging(NAME) as staged:
                        lora = {"r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(modules)}
                        base = build_random_adapter(base, staged, seed, **lora).unload()
                        manifest = Manifest(name=NAME, version=0, base_model=BaseModelRef(id="t", sha256="0"))
                        version = volume.publish(staged, manifest).version
                    published[version] = (rank, modules)
            except BaseException as exc:  # surfaced below
                failures.append(exc)

        seen: list[tuple[int, int, set[str]]] = []
        thread = threading.Thread(target=publisher)
        thread.start()
        while True:
            done = not thread.is_alive()
            for listing in volume.list():
                assert listing.name == NAME and listing.latest in listing.versions
            try:
                adapter = volume.resolve(NAME)
            except AdapterNotFound:
                assert not done, "nothing published"
                continue
            weights = load_adapter(adapter.path, config)  # raises on a torn folder
            assert adapter.manifest() is not None and adapter.manifest().version == adapter.version
            seen.append((adapter.version, weights.max_rank, set(weights.target_modules)))
            if done:
                break
        thread.join()
        assert not failures, failures
        assert seen and seen[-1][0] == len(specs), "the reader ends on the last version"
        for version, rank, modules in seen:
            assert (rank, modules) == published[version], f"v{version} is not what was published"
