"""Every supported architecture served exactly: greedy parity with HF generate (base) and PEFT
(all-linear adapters of two ranks, mixed with the base in one batch), chunked prefill, both matmul
layouts, the startup parity probe and prompt (echo) logprobs; tiny random bases from each
architecture's own config, plus the other shapes of TINY_VARIANTS (DistilGPT-2's 6 layers, OPT-350m's
post-norm with project_in/project_out).

The tiny bases' sliding window (lorayard.testing.random_base.SLIDING_WINDOW) is shorter than the
prompts, so the windowed layers are exercised; the llama base carries Llama 3 rope scaling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lorayard.adapter_files import load_adapter
from lorayard.architectures import ARCHITECTURES
from lorayard.base_model import load_base_model, resolve_base_model
from lorayard.server.engine.block_pool import BlockSpec, KVBlockStorage
from lorayard.server.engine.engine import Engine
from lorayard.server.engine.model_runner import ModelRunner
from lorayard.server.engine.parity_probe import probe_runner
from lorayard.server.engine.prepacked_linear import prepack_available
from lorayard.server.engine.types import Request, SamplingParams
from lorayard.server.settings import Settings
from lorayard.testing.random_adapter import build_random_adapter
from lorayard.testing.random_base import SLIDING_WINDOW, TINY_VARIANTS

from ..conftest import peft_greedy
from .test_prompt_logprobs import TOP, _assert_matches, _reference_logprobs

# Vision-language bases (their image paths, M-RoPE, language-model-only adapters): test_vision.py.
SUPPORTED = sorted(name for name, arch in ARCHITECTURES.items() if not arch.vision) + sorted(TINY_VARIANTS)
# Every decoder linear of the architecture (PEFT's all-linear would also take OPT-350m's project_in
# and project_out, which sit outside the decoder blocks and which no adapter of ours may target).
ADAPTERS = {
    "all8": {"r": 8, "lora_alpha": 16},
    "all4": {"r": 4, "lora_alpha": 4, "use_rslora": True},
}


def _arch(name: str):
    return ARCHITECTURES[TINY_VARIANTS.get(name, (name, {}))[0]]


PROMPTS = [[1, 9690, 198, 2683, 359, 253, 42, 7], [1, 4093, 198, 19556, 30, 2, 11], [1, 520, 33, 44, 55, 66]]
MAX_TOKENS = 8


@pytest.fixture(scope="session")
def arch_bases(tmp_path_factory, tiny_arch_base):
    """model_type -> (base folder, adapter folders), built once per session on first use."""
    built: dict[str, tuple[Path, dict[str, Path]]] = {}

    def get(model_type: str) -> tuple[Path, dict[str, Path]]:
        if model_type not in built:
            base = tiny_arch_base(model_type)
            root = tmp_path_factory.mktemp(f"adapters-{model_type}")
            adapters = {}
            for seed, (name, spec) in enumerate(ADAPTERS.items()):
                adapters[name] = root / name
                targets = list(_arch(model_type).lora_targets)
                build_random_adapter(base, adapters[name], seed, b_scale=4.0, target_modules=targets, **spec)
            built[model_type] = (base, adapters)
        return built[model_type]

    return get


def _engine(base: Path, device: str, *, fuse_linears: bool | None = None, **settings) -> Engine:
    config = Settings(device=device, **{"max_model_len": 128, **settings}).engine_config()
    return Engine.from_base(
        resolve_base_model(str(base)),
        config,
        dtype=torch.float32,
        eos_token_ids=set(),
        fuse_linears=fuse_linears,
    )


class _Handle:
    def __init__(self, key: str, slot: int) -> None:
        self.name = key.split("@")[0]
        self.key, self.slot = key, slot


def _load(engine: Engine, base: Path, folder: Path) -> _Handle:
    weights = load_adapter(folder, AutoConfig.from_pretrained(base))
    return _Handle(folder.name, engine.load_adapter_weights(folder.name, weights))


def _generate(
    engine: Engine, cases: list[tuple[_Handle | None, list[int]]], max_tokens: int
) -> list[list[int]]:
    async def collect(request: Request) -> list[int]:
        return [e.token_id async for e in engine.submit(request) if e.token_id is not None]

    async def run() -> list[list[int]]:
        engine.start()
        tasks = []
        for i, (handle, prompt) in enumerate(cases):
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
            tasks.append(asyncio.create_task(collect(Request(uuid.uuid4().hex, prompt, params, handle))))
            await asyncio.sleep(0.01 * i)  # join a batch already decoding
        return await asyncio.gather(*tasks)

    try:
        return asyncio.run(run())
    finally:
        engine.stop()


def _layouts(model_type: str) -> list[bool]:
    # Phi-3's and GPT-2's q/k/v are one linear already, OPT's are biased: there is only one layout.
    return [False, True] if _arch(model_type).fusable else [False]


CASES = [(t, fuse) for t in SUPPORTED for fuse in _layouts(t)]


@pytest.mark.parametrize(("model_type", "fuse_linears"), CASES, ids=[f"{t}-fused{int(f)}" for t, f in CASES])
def test_mixed_batch_matches_hf_and_peft(arch_bases, test_device, model_type, fuse_linears):
    """Base rows and two all-linear adapters of different ranks in one batch, each equal to HF/PEFT."""
    base, adapters = arch_bases(model_type)
    assert all(len(p) > SLIDING_WINDOW for p in PROMPTS)
    engine = _engine(base, test_device, max_batch_size=8, fuse_linears=fuse_linears)
    handles = {name: _load(engine, base, folder) for name, folder in adapters.items()}
    names = [None, "all8", "all4", "all8", None, "all4"]
    cases = [(handles.get(name), PROMPTS[i % len(PROMPTS)]) for i, name in enumerate(names)]
    results = _generate(engine, cases, MAX_TOKENS)
    for name, (_, prompt), tokens in zip(names, cases, results, strict=True):
        expected = peft_greedy(base, adapters[name] if name else None, prompt, MAX_TOKENS)
        assert tokens == expected, (model_type, name)
    assert results[1] != peft_greedy(base, None, PROMPTS[1], MAX_TOKENS), "the adapter must change the output"


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_bf16_prepacked_linears_change_no_token(arch_bases, test_device, model_type):
    """bf16 on the CPU runs every decoder linear and the lm_head over prepacked weights (Conv1D and
    fused projections included): the same tokens as the same engine over plain modules, base rows
    and both adapters in one batch, and base rows equal to HF's generate in bf16. (Adapter rows are
    not compared with PEFT in bf16 here: on these random bases its rounding of the LoRA path differs
    from ours with or without packing; the embedded base's bf16 test covers PEFT in bf16.)"""
    base, adapters = arch_bases(model_type)
    names = [None, "all8", "all4"]
    results = []
    for prepack in (True, False):
        config = Settings(device=test_device, max_model_len=128, max_batch_size=4).engine_config()
        model = load_base_model(resolve_base_model(str(base)), device=test_device, dtype=torch.bfloat16)
        engine = Engine(model.eval(), config, eos_token_ids=set(), prepack=prepack)
        if prepack and test_device == "cpu" and prepack_available(torch.bfloat16, torch.device("cpu")):
            assert engine.runner.prepacked.linears == sum(len(layer) for layer in engine.runner.linears) + 1
        handles = {name: _load(engine, base, folder) for name, folder in adapters.items()}
        cases = [(handles.get(name), PROMPTS[i]) for i, name in enumerate(names)]
        results.append(_generate(engine, cases, MAX_TOKENS))
    assert results[0] == results[1]
    assert results[0][0] == peft_greedy(base, None, PROMPTS[0], MAX_TOKENS, dtype=torch.bfloat16)
    assert results[0][1] != results[0][0], "the adapter must change the output"


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_static_decode_matches_peft(arch_bases, test_device, model_type):
    """The static decode step (``--decode-mode static``, the CUDA graphs' step run eagerly) in the
    GPU's matmul layout: sliding windows, soft caps, q/k norms and Phi-3's fused linears included."""
    base, adapters = arch_bases(model_type)
    engine = _engine(
        base, test_device, max_batch_size=4, decode_mode="static", fuse_linears=_layouts(model_type)[-1]
    )
    handles = {name: _load(engine, base, folder) for name, folder in adapters.items()}
    names = [None, "all8", "all4"]
    cases = [(handles.get(name), PROMPTS[i]) for i, name in enumerate(names)]
    results = _generate(engine, cases, MAX_TOKENS)
    for name, (_, prompt), tokens in zip(names, cases, results, strict=True):
        assert tokens == peft_greedy(base, adapters[name] if name else None, prompt, MAX_TOKENS), name
    assert engine.runner.static_passes


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_chunked_prefill_matches_peft(arch_bases, test_device, model_type):
    base, adapters = arch_bases(model_type)
    engine = _engine(base, test_device, max_batch_size=2, prefill_chunk=3, idle_prefill_chunk=3)
    handle = _load(engine, base, adapters["all8"])
    prompt = [(i * 37) % 5000 + 3 for i in range(17)]
    [tokens] = _generate(engine, [(handle, prompt)], 6)
    assert tokens == peft_greedy(base, adapters["all8"], prompt, 6)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_parity_probe_passes_and_catches_a_wrong_spec(arch_bases, model_type):
    """The startup probe accepts the right forward and refuses one with a single spec field wrong."""
    base, _ = arch_bases(model_type)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert probe_runner(model).ok
    config = model.config
    spec = BlockSpec.of_model(config, torch.float32)
    runner = ModelRunner(model, KVBlockStorage(spec, 2, "cpu"), fuse_linears=False)
    arch = runner.arch
    if runner.post_norm:
        runner.post_norm = False  # normalizes OPT-350m's blocks before, not after, the residual add
    elif arch.sandwich_norms:
        runner.arch = dataclasses.replace(arch, plain_rms_norm=True)  # forgets Gemma's (1 + w)
    elif arch.qk_norm:
        runner.arch = dataclasses.replace(arch, qk_norm=False)
    elif any(runner.windows):
        runner.windows = [None] * len(runner.windows)  # ignores the sliding windows
    else:
        runner.scaling = [s * 2 for s in runner.scaling]  # a wrong attention scale
    result = probe_runner(model, runner)
    assert not result.ok, result


# OPT-350m's tiny project_in reads 32 features, below bitsandbytes' CPU block of 64: HF's own 4-bit
# forward fails on it there (the real model's 512 are fine), so the 4-bit OPT test is OPT-125m-shaped.
@pytest.mark.parametrize("model_type", ["qwen3", "gpt2", "opt"])
def test_4bit_with_adapter_matches_peft_on_the_same_4bit_base(arch_bases, test_device, model_type):
    """QLoRA serving on Qwen3 (q/k norms), GPT-2 (Conv1D linears, which transformers quantizes as
    Linear4bit) and OPT: NF4 base + LoRA equals PEFT over the same NF4 base."""
    from transformers import BitsAndBytesConfig

    base, adapters = arch_bases(model_type)
    engine = _engine(base, test_device, quantization="4bit", max_batch_size=2, max_model_len=64)
    handle = _load(engine, base, adapters["all8"])
    [tokens] = _generate(engine, [(handle, PROMPTS[0])], 6)
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype="float32",
    )
    assert tokens == peft_greedy(base, adapters["all8"], PROMPTS[0], 6, quantization_config=nf4)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_echo_logprobs_equal_hf(arch_bases, test_device, model_type):
    """Prompt logprobs (what echo with logprobs returns) of base and adapter rows prefilled side by side,
    in chunks of 5, equal the log-softmax of the HF / PEFT forward."""
    base, adapters = arch_bases(model_type)
    engine = _engine(base, test_device, max_batch_size=4, prefill_chunk=5, idle_prefill_chunk=5)
    handle = _load(engine, base, adapters["all4"])
    prompt = [(i * 37) % 5000 + 3 for i in range(13)]
    score = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=TOP)

    async def run():
        engine.start()

        async def events(request: Request):
            return [e async for e in engine.submit(request)]

        requests = [Request(uuid.uuid4().hex, prompt, score, h) for h in (None, handle)]
        return await asyncio.gather(*(events(r) for r in requests))

    try:
        results = asyncio.run(run())
    finally:
        engine.stop()
    for adapter_dir, events in zip((None, adapters["all4"]), results, strict=True):
        _assert_matches(events[0].prompt_logprobs, _reference_logprobs(base, adapter_dir, prompt), prompt)


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_learned_positions_cap_the_context_at_their_table(arch_bases, model_type):
    """GPT-2's n_positions and OPT's max_position_embeddings rows are all the positions there are: a
    longer --max-model-len is capped there, so no request can index past the table."""
    base, _ = arch_bases(model_type)
    limit = AutoConfig.from_pretrained(base).max_position_embeddings
    assert _engine(base, "cpu", max_model_len=4 * limit).max_model_len == limit


DORA_TARGETS = {
    "gpt2": ["c_attn", "c_fc"],
    "opt": ["q_proj", "fc1"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
}


@pytest.mark.parametrize("model_type", sorted(DORA_TARGETS))
def test_dora_on_biased_linears_matches_peft(arch_bases, tmp_path, test_device, model_type):
    """DoRA on linears with a bias (GPT-2's Conv1D, stored [in, out]; OPT's; Qwen2's q/k/v): PEFT
    rescales W x by the row scale and adds the bias unscaled, and so do we."""
    base, _ = arch_bases(model_type)
    targets = DORA_TARGETS[model_type]
    build_random_adapter(
        base, tmp_path / "dora", 3, b_scale=4.0, r=4, lora_alpha=8, target_modules=targets, use_dora=True
    )
    engine = _engine(base, test_device, max_batch_size=2)
    handle = _load(engine, base, tmp_path / "dora")
    [tokens] = _generate(engine, [(handle, PROMPTS[0])], MAX_TOKENS)
    assert tokens == peft_greedy(base, tmp_path / "dora", PROMPTS[0], MAX_TOKENS)
    assert tokens != peft_greedy(base, None, PROMPTS[0], MAX_TOKENS)
