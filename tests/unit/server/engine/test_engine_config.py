"""EngineConfig comes from Settings (every default lives there), profiler switch included."""

import dataclasses
import json

from lorayard.server.engine.config import EngineConfig, default_max_batch_size
from lorayard.server.settings import Settings, parse_settings


def test_every_engine_field_is_a_setting_of_the_same_name():
    settings = Settings()
    config = settings.engine_config()
    for field in dataclasses.fields(EngineConfig):
        assert getattr(config, field.name) == getattr(settings, field.name)


def test_the_profile_dir_comes_from_flag_or_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAYARD_TORCH_PROFILE_DIR", str(tmp_path / "env"))
    assert parse_settings([]).engine_config().torch_profile_dir == tmp_path / "env"
    flag = ["--torch-profile-dir", str(tmp_path / "flag")]
    assert parse_settings(flag).engine_config().torch_profile_dir == tmp_path / "flag"


def test_an_engine_with_a_profile_dir_writes_its_op_table_on_stop(make_engine, tmp_path):
    engine = make_engine(max_batch_size=1, max_model_len=32, torch_profile_dir=tmp_path / "prof")
    engine.start()
    engine.stop()
    assert isinstance(json.loads((tmp_path / "prof" / "engine_ops.json").read_text()), list)
    assert (tmp_path / "prof" / "engine_ops.txt").is_file()


def test_the_batch_limit_defaults_by_device_and_the_kv_pool_is_capped_by_it(make_engine):
    """Unset, --max-batch-size is 16 on the CPU and 256 on a GPU (the pool decides how many fit); the
    pool never holds more blocks than that many full-length requests could use."""
    assert Settings().max_batch_size is None
    assert (default_max_batch_size("cpu"), default_max_batch_size("cuda:0")) == (16, 256)
    engine = make_engine(max_model_len=64)
    assert engine.max_batch_size == default_max_batch_size(engine.device)
    assert engine.pool.num_blocks == engine.max_batch_size * 64 // engine.pool.block_size
    assert parse_settings(["--no-prefix-caching"]).engine_config().prefix_caching is False
    assert Settings().engine_config().prefix_caching is True
