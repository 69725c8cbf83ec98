"""TrainConfig: YAML + CLI layering, unknown keys, resolved defaults, --print-config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from train_job.__main__ import EXIT_CONFIG, main
from train_job.config import (
    DEFAULT_CONFIG,
    DEMO_DATA_DIR,
    ENV_ADAPTERS_DIR,
    ConfigError,
    TrainConfig,
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
