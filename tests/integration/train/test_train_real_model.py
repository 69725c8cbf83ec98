"""The done-criterion on the real embedded model: a few steps, published, reloaded by plain PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorayard.adapter_files import load_adapter
from lorayard.volume import AdapterVolume, read_manifest

REPO = Path(__file__).resolve().parents[3]
PUBLISHED_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "manifest.json",
    "eval.json",
    "loss_curve.png",
}


def test_train_publish_and_reload_with_plain_peft(tmp_path, real_base):
    data = tmp_path / "tiny.jsonl"
    rows = [
        {
            "instruction": f"Say something about the number {i}.",
            "output": f"Arr, {i} be a fine number, matey!",
        }
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapters = tmp_path / "adapters"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lorayard.train", "--adapters-dir", str(adapters), "--name", "real",
         "--data", str(data), "--max-steps", "3", "--batch-size", "4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (adapters / "real" / "LATEST").read_text().strip() == "v1"
    folder = AdapterVolume(adapters).resolve("real").path
    assert {p.name for p in folder.iterdir()} == PUBLISHED_FILES
    manifest = read_manifest(folder)
    assert manifest.base_model.sha256 == real_base.fingerprint
    assert manifest.metrics["global_step"] == 3

    base = AutoModelForCausalLM.from_pretrained(real_base.path, dtype=torch.float32).eval()
    load_adapter(folder, base.config)
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 2]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(folder)).eval()
        adapter_logits = adapted(ids).logits
    assert adapter_logits.shape == base_logits.shape
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)
