"""`make demo` without its two 2.5-minute trainings: the demo configs validate, and the serve-and-query
half runs against adapters published under the demo's names (random PEFT adapters on the real base)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from demo.__main__ import CONFIGS
from lorayard.testing.random_adapter import build_random_adapter
from lorayard.testing.server import publish_folder
from lorayard.volume import AdapterVolume

REPO = Path(__file__).resolve().parents[3]  # `python -m demo` runs from the checkout


@pytest.mark.parametrize("name", list(CONFIGS))
def test_demo_configs_and_data_validate(name, tmp_path):
    command = [sys.executable, "-m", "lorayard.train", "--config", CONFIGS[name], "--name", name]
    done = subprocess.run(
        [*command, "--adapters-dir", str(tmp_path), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "data OK" in done.stdout
    assert not (tmp_path / name).exists()


def test_demo_serves_and_queries_published_adapters(real_base, tmp_path):
    volume = AdapterVolume(tmp_path / "adapters")
    for seed, name in enumerate(CONFIGS):
        source = tmp_path / f"source-{name}"
        build_random_adapter(
            real_base.path, source, seed, b_scale=0.3, r=8, target_modules=["q_proj", "v_proj"]
        )
        publish_folder(volume, name, source, real_base.fingerprint, real_base.model_id)
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "demo", "--skip-training", "--adapters-dir", str(volume.root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "models: smollm2-135m-instruct" in done.stdout
    assert "streaming from the pirate adapter" in done.stdout
    for name in CONFIGS:
        assert f"{name}: {volume.root / name / 'v1'}/" in done.stdout
