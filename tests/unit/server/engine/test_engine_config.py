"""EngineConfig comes from Settings (every default lives there), profiler switch included."""

import asyncio
import dataclasses
import json
import uuid

import torch
from transformers import AutoConfig

from lorayard.adapter_files import load_adapter
from lorayard.server.engine.config import EngineConfig, default_max_batch_size, weight_dtype
from lorayard.server.engine.engine import Engine
from lorayard.server.engine.parity_probe import TOLERANCE, probe_runner
from lorayard.server.engine.types import Request, SamplingParams
from lorayard.server.settings import Settings, parse_settings

from ..conftest import peft_greedy


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


class _Adapter:
    """What the registry hands the engine: the adapter's key and load slot."""

    def __init__(self, key: str, slot: int) -> None:
        self.name = self.key = key
        self.slot = slot


def test_dtype_auto_is_float32_on_the_cpu_and_bfloat16_is_probed_and_greedy_against_hf_in_bf16(
    tiny_base, tiny_base_dir, tiny_adapters
):
    """--dtype bfloat16 on the CPU (issue 30): the base, the adapters and the KV cache in bf16; the
    startup probe holds it to bf16's tolerance against HF in bf16 (not float32), and greedy output
    equals PEFT's generate in bf16, base and adapter batched together. auto stays float32."""
    assert Settings().dtype == "auto" and weight_dtype("auto", "cpu") == torch.float32
    config = parse_settings(
        ["--dtype", "bfloat16", "--device", "cpu", "--max-model-len", "64"]
    ).engine_config()
    engine = Engine.from_base(tiny_base, config, eos_token_ids=set())
    try:
        assert engine.model.dtype == engine.kv.k[0].dtype == torch.bfloat16
        probe = probe_runner(engine.model, engine.runner)
        assert probe.tolerance == TOLERANCE[torch.bfloat16] and probe.ok
        weights = load_adapter(tiny_adapters / "all8", AutoConfig.from_pretrained(tiny_base_dir))
        adapter = _Adapter("all8", engine.load_adapter_weights("all8", weights))
        prompt, max_tokens = [1, 9690, 198, 2683, 359, 253], 8

        async def run() -> list[list[int]]:
            engine.start()

            async def tokens(handle: _Adapter | None) -> list[int]:
                params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
                stream = engine.submit(Request(uuid.uuid4().hex, prompt, params, handle))
                return [e.token_id async for e in stream if e.token_id is not None]

            return list(await asyncio.gather(tokens(None), tokens(adapter)))

        base_out, adapter_out = asyncio.run(run())
    finally:
        engine.stop()
    bf16 = torch.bfloat16
    assert base_out == peft_greedy(tiny_base_dir, None, prompt, max_tokens, dtype=bf16)
    assert adapter_out == peft_greedy(tiny_base_dir, tiny_adapters / "all8", prompt, max_tokens, dtype=bf16)
    assert adapter_out != base_out
