"""Property: a reader racing a publisher never sees a torn adapter version.

A thread publishes random small adapters (ranks, target modules) one after another while this thread
keeps doing what the server does: ``list()``, ``resolve()`` and ``load_adapter`` on what resolve
returned. Every version a reader sees must load completely and be exactly what was published under it.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import AutoConfig

from lorayard.adapter_files import TARGETABLE_MODULES, expected_linear_shapes, load_adapter
from lorayard.volume import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterNotFound,
    AdapterVolume,
    BaseModelRef,
    Manifest,
)

NAME = "racy"
SPEC = st.tuples(st.integers(1, 8), st.sets(st.sampled_from(TARGETABLE_MODULES), min_size=1, max_size=3))


def write_adapter(folder: Path, config, rank: int, modules: set[str]) -> None:
    """A PEFT-format LoRA file set, written directly (fast): random A, B for each target module."""
    shapes = expected_linear_shapes(config)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in sorted(modules):
            group = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            in_features, out_features = shapes[module]
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank)
    save_file(tensors, folder / ADAPTER_WEIGHTS_FILE)
    adapter_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(modules),
    }
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(SPEC, min_size=1, max_size=5))
def test_reader_never_sees_a_torn_version(tiny_base_dir, specs):
    config = AutoConfig.from_pretrained(tiny_base_dir)
    with tempfile.TemporaryDirectory() as tmp:
        volume = AdapterVolume(Path(tmp))
        published: dict[int, tuple[int, set[str]]] = {}
        failures: list[BaseException] = []

        def publisher() -> None:
            try:
                for rank, modules in specs:
                    with volume.staging(NAME) as staged:
                        write_adapter(staged, config, rank, modules)
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
