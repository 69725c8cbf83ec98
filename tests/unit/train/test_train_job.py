"""The training job end to end on the tiny random model: publish, DoRA/rsLoRA, QLoRA, if-better,
dry run, generate and merge (in-process through main(), real files, real training)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorayard.adapter_files import load_adapter
from lorayard.base_model import resolve_base_model
from lorayard.chat_format import render_prompt, stop_token_ids
from lorayard.train.__main__ import EXIT_NOT_BETTER, main
from lorayard.volume import AdapterVolume, read_manifest

ADAPTER_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "manifest.json",
    "eval.json",
    "loss_curve.png",
}


def test_train_publishes_a_complete_version(tiny_args, tiny_base_dir, adapters_dir, chat_file, capsys):
    assert main([*tiny_args, "--name", "demo", "--max-steps", "4", "--rank", "4"]) == 0
    assert "base vs adapter" in capsys.readouterr().out  # the comparison table
    assert (adapters_dir / "demo" / "LATEST").read_text().strip() == "v1"
    folder = AdapterVolume(adapters_dir).resolve("demo").path
    assert {p.name for p in folder.iterdir()} == ADAPTER_FILES
    assert (folder / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"

    manifest = read_manifest(folder)
    assert (manifest.name, manifest.version) == ("demo", 1)
    assert manifest.base_model.id == str(tiny_base_dir)
    assert manifest.base_model.sha256 == resolve_base_model(str(tiny_base_dir)).fingerprint
    (dataset,) = manifest.datasets
    assert (dataset.path, dataset.rows_train, dataset.rows_validation) == (str(chat_file), 9, 1)
    assert manifest.config["rank"] == 4 and manifest.config["max_steps"] == 4
    assert manifest.metrics["global_step"] == 4
    assert {"torch", "transformers", "peft"} <= set(manifest.library_versions)

    report = json.loads((folder / "eval.json").read_text())
    assert report["adapter"]["perplexity"] == pytest.approx(math.exp(report["adapter"]["loss"]))
    assert report["base"]["loss"] != report["adapter"]["loss"]
    assert 0 < report["trainable_percent"] < 100
    assert manifest.metrics["eval_loss"] == report["adapter"]["loss"]
    assert len(report["samples"]) == 1 and {"base", "adapter", "chrf_adapter"} <= set(report["samples"][0])
    assert any("eval_loss" in point for point in report["loss_history"])

    weights = load_adapter(folder, _config(tiny_base_dir))  # what the server will do
    assert weights.max_rank == 4
    assert weights.target_modules == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert not (adapters_dir / ".staging" / "runs" / "demo").exists()  # checkpoints cleaned after publish


def _config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def test_dora_and_rslora_pass_the_serving_check(tiny_args, tiny_base_dir, adapters_dir):
    args = [*tiny_args, "--name", "dora", "--max-steps", "2", "--rank", "4", "--alpha", "8"]
    assert main([*args, "--use-dora", "--use-rslora", "--target-modules", "q_proj,v_proj"]) == 0
    weights = load_adapter(AdapterVolume(adapters_dir).resolve("dora").path, _config(tiny_base_dir))
    assert weights.uses_dora and weights.target_modules == ["q_proj", "v_proj"]
    assert {m.scaling for m in weights.modules.values()} == {8 / math.sqrt(4)}


def test_qlora_4bit_trains_and_publishes(tiny_args, tiny_base_dir, adapters_dir):
    # bitsandbytes' NF4 works on the CPU (slowly); the tiny model's dims (64, 128) are fine for it.
    assert main([*tiny_args, "--name", "q4", "--max-steps", "2", "--quantization", "4bit"]) == 0
    folder = AdapterVolume(adapters_dir).resolve("q4").path
    assert read_manifest(folder).config["quantization"] == "4bit"
    load_adapter(folder, _config(tiny_base_dir))


def test_publish_if_better_refuses_a_worse_adapter(tiny_args, adapters_dir, capsys):
    args = [*tiny_args, "--name", "gate", "--max-steps", "2"]
    assert main(args) == 0
    manifest_file = adapters_dir / "gate" / "v1" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["metrics"]["eval_loss"] = 0.0  # LATEST now claims a perfect validation loss
    manifest_file.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main([*args, "--publish-if-better"]) == EXIT_NOT_BETTER
    assert "worse than LATEST v1" in capsys.readouterr().err
    assert AdapterVolume(adapters_dir).versions("gate") == [1]

    manifest["metrics"]["eval_loss"] = 1e9
    manifest_file.write_text(json.dumps(manifest))
    assert main([*args, "--publish-if-better"]) == 0
    assert AdapterVolume(adapters_dir).versions("gate") == [1, 2]


def test_dry_run_shows_masks_and_publishes_nothing(tiny_args, adapters_dir, capsys):
    assert main([*tiny_args, "--name", "dry", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "data OK: 9 training, 1 validation" in out
    assert "⟦Answer number" in out and "<|im_end|>⟧" in out  # the trained span ends with end-of-turn
    assert "rank: 16" in out  # the resolved config
    assert not (adapters_dir / "dry").exists()


@pytest.fixture
def published(tiny_args, adapters_dir):
    assert main([*tiny_args, "--name", "gen", "--max-steps", "3", "--lr", "5e-2"]) == 0
    return AdapterVolume(adapters_dir).resolve("gen").path


def test_generate_matches_plain_peft(published, tiny_base_dir, real_tokenizer, capsys):
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(published),
                "--prompt",
                "Question number 3?",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    answer = capsys.readouterr().out.strip()

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), published).eval()
    ids = torch.tensor([render_prompt(real_tokenizer, [{"role": "user", "content": "Question number 3?"}])])
    out = model.generate(
        input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=sorted(stop_token_ids(real_tokenizer))
    )
    assert answer == real_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_merge_writes_a_full_model_with_the_adapter_folded_in(published, tiny_base_dir, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(published), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), published).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval()
    with torch.no_grad():
        expected = peft(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(base(ids).logits, expected, atol=1e-4)


def test_packed_batches_give_the_padded_loss_and_train(
    tiny_args, tiny_base_dir, adapters_dir, real_tokenizer
):
    """Packing must not let examples attend to each other: same loss and logits as padding."""
    from lorayard.train.config import TrainConfig
    from lorayard.train.train import IGNORE_INDEX, collator

    torch.manual_seed(0)
    features = []
    for length in (7, 12, 5):
        ids = torch.randint(10, 1000, (length,)).tolist()
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:]})
    padded = collator(TrainConfig(), real_tokenizer)(features)
    packed = collator(TrainConfig(packing=True), real_tokenizer)(features)
    assert packed["input_ids"].shape == (1, 24) and "attention_mask" not in packed
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = model(**padded, use_cache=False), model(**packed, use_cache=False)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)
    assert torch.allclose(a.logits[1, :12], b.logits[0, 7:19], atol=1e-5)

    assert main([*tiny_args, "--name", "packed", "--max-steps", "2", "--packing"]) == 0
    assert read_manifest(AdapterVolume(adapters_dir).resolve("packed").path).config["packing"] is True
