"""TrainConfig: YAML + CLI layering, unknown keys, resolved defaults, --print-config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorayard.train.__main__ import EXIT_CONFIG, main
from lorayard.train.config import (
    DEFAULT_CONFIG,
    DEMO_DATA_DIR,
    ENV_ADAPTERS_DIR,
    ConfigError,
    TrainConfig,
    flags_markdown,
    load_config,
)


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("name: x\ndata: [a.jsonl]\nlearning_rte: 0.1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config, {})
    assert "learning_rte" in str(caught.value)
    assert str(config) in str(caught.value)


def test_unknown_key_exits_with_config_code(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("ranks: 8\n")
    assert main(["--config", str(config)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "'ranks'" in err and "'rank'" in err  # names the key and suggests the close one


def test_bad_value_names_the_field(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: [a.jsonl]\nval_fraction: 0.9\n")
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(config, {})


def test_yaml_paths_are_relative_to_the_file_and_flags_win(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_ADAPTERS_DIR, raising=False)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "run.yaml").write_text("name: a\ndata: [data/train.jsonl]\nrank: 4\nlr: 0.5\n")
    config = load_config(folder / "run.yaml", {"rank": 8, "name": "b"})
    assert config.data == [folder / "data" / "train.jsonl"]
    assert (config.rank, config.lr, config.name) == (8, 0.5, "b")
    assert config.adapters_dir == tmp_path / "adapters"
    assert config.output_dir == tmp_path / "adapters" / ".staging" / "runs" / "b"
    assert config.base_model  # filled by lorayard.base_model.default_base_model()


def test_adapters_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ADAPTERS_DIR, str(tmp_path / "vol"))
    assert load_config(None, {}).adapters_dir == tmp_path / "vol"


def test_default_config_is_the_persona_demo():
    config = load_config(None, {})
    assert config.name == "persona"
    assert config.data == [DEMO_DATA_DIR / "persona.jsonl"]
    assert DEFAULT_CONFIG.is_file()


def test_save_steps_must_fit_eval_steps():
    with pytest.raises(ValueError, match="save_steps"):
        TrainConfig(data=[Path("x")], eval_steps=4, save_steps=6)


def test_every_field_is_documented():
    assert all(field.description for field in TrainConfig.model_fields.values())


def test_print_config_shows_the_resolved_config(tmp_path, capsys):
    assert main(["--print-config", "--adapters-dir", str(tmp_path), "--rank", "4", "--max-steps", "7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["rank"] == 4 and shown["max_steps"] == 7
    assert shown["adapters_dir"] == str(tmp_path)
    assert set(shown) == set(TrainConfig.model_fields)


def test_every_field_is_a_flag_and_the_first_spellings_still_work(tmp_path, capsys):
    argv = ["--print-config", "--adapters-dir", str(tmp_path)]
    argv += ["--format", "alpaca", "--alpha", "8", "--target-modules", "q_proj,v_proj", "--packing"]
    argv += ["--no-load-best-model-at-end", "--layers-to-transform", "0", "1", "--report-to", "tensorboard"]
    argv += ["--lr-scheduler", "linear", "--quantization", "4bit", "--warmup-ratio", "0.2"]
    assert main(argv) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["data_format"] == "alpaca" and shown["lora_alpha"] == 8
    assert shown["target_modules"] == ["q_proj", "v_proj"] and shown["packing"] is True
    assert shown["load_best_model_at_end"] is False and shown["layers_to_transform"] == [0, 1]
    assert shown["report_to"] == ["tensorboard"] and shown["lr_scheduler"] == "linear"
    assert shown["quantization"] == "4bit" and shown["warmup_ratio"] == 0.2
    table = flags_markdown()
    for name in TrainConfig.model_fields:
        assert f"`--{name.replace('_', '-')}`" in table


def test_a_bad_flag_value_is_a_config_error(tmp_path, capsys):
    assert main(["--print-config", "--adapters-dir", str(tmp_path), "--warmup-ratio", "2"]) == EXIT_CONFIG
    assert "warmup_ratio" in capsys.readouterr().err
