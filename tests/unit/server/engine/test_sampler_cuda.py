"""The sampler and the engine's sampling on a GPU: every rule on CUDA logits equals the CPU's, seeded
requests reproduce, and the engine's greedy decode on CUDA equals HF's generate. Skipped without CUDA
(``bench/gpu_run.sh`` runs them on the lent GPU machine)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from lorayard.server.engine.engine import Engine
from lorayard.server.engine.sampler import SequenceState, greedy_tokens, sample_row
from lorayard.server.engine.types import Request, SamplingParams
from lorayard.server.settings import Settings

from ..conftest import peft_greedy
from .test_engine import PROMPTS, _collect, _load

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EOS = frozenset({3})
VOCAB = 64


def _state(prompt=(0, 5, 5), output=(7, 7, 9), **params) -> SequenceState:
    state = SequenceState.create(SamplingParams(max_tokens=16, **params), list(prompt))
    state.output_ids.extend(output)
    return state


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0, "logprobs": 5},
        {"temperature": 0.0, "repetition_penalty": 1.7, "logprobs": 3},
        {"temperature": 0.0, "presence_penalty": 1.5, "frequency_penalty": 0.8, "logprobs": 3},
        {"temperature": 0.0, "logit_bias": ((11, 9.0), (12, -100.0)), "logprobs": 2},
        {"temperature": 0.0, "min_tokens": 8, "logprobs": 1},
    ],
    ids=["greedy", "repetition", "presence-frequency", "logit-bias", "min-tokens"],
)
def test_every_rule_on_cuda_logits_equals_the_cpu(params):
    logits = _logits(1)
    logits[3] = 50.0  # EOS would win but for min_tokens
    cpu = sample_row(logits, _state(**params), EOS)
    gpu = sample_row(logits.cuda(), _state(**params), EOS)
    assert gpu.token_id == cpu.token_id
    assert gpu.logprob == pytest.approx(cpu.logprob, abs=1e-5)
    assert [t.token_id for t in gpu.top_logprobs] == [t.token_id for t in cpu.top_logprobs]
    assert [t.logprob for t in gpu.top_logprobs] == pytest.approx(
        [t.logprob for t in cpu.top_logprobs], abs=1e-5
    )


def test_seeded_sampling_on_cuda_is_reproducible_and_seed_dependent():
    logits = _logits(2).cuda()

    def draws(seed: int) -> list[int]:
        state = _state(temperature=1.0, seed=seed, presence_penalty=0.5)
        return [sample_row(logits, state, EOS).token_id for _ in range(32)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    state = _state(temperature=1.0, seed=7)
    sample_row(logits, state, EOS)
    assert state.generator is not None and state.generator.device.type == "cuda"


def test_top_k_and_top_p_draw_only_allowed_tokens_on_cuda():
    logits = _logits(3).cuda()
    best = torch.topk(logits, 4).indices.tolist()
    top_k = _state(temperature=1.0, top_k=4, seed=1)
    assert {sample_row(logits, top_k, EOS).token_id for _ in range(200)} <= set(best)
    probs = torch.softmax(logits, dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    mass, nucleus = 0.0, []
    for token in order:  # the smallest set whose mass reaches 0.5
        nucleus.append(token)
        mass += float(probs[token])
        if mass >= 0.5:
            break
    top_p = _state(temperature=1.0, top_p=0.5, seed=2)
    assert {sample_row(logits, top_p, EOS).token_id for _ in range(200)} <= set(nucleus)


def test_a_greedy_batch_on_cuda_is_one_argmax():
    logits = torch.stack([_logits(i) for i in range(4)]).cuda()
    states = [_state(temperature=0.0) for _ in range(4)]
    tokens = greedy_tokens(logits, states)
    assert [t.token_id for t in tokens] == torch.argmax(logits, dim=-1).tolist()


@pytest.fixture
def cuda_engine(tiny_base):
    engine = Engine.from_base(
        tiny_base,
        Settings(device="cuda", max_batch_size=8, max_model_len=128).engine_config(),
        eos_token_ids=set(),
        dtype=torch.float32,
    )
    yield engine
    engine.stop()


def _run(engine, cases):
    async def run():
        engine.start()
        return await asyncio.gather(*(_collect(engine, Request(uuid.uuid4().hex, *case)) for case in cases))

    return asyncio.run(run())


def test_engine_on_cuda_seeded_and_penalized_requests_and_greedy_parity(
    cuda_engine, tiny_base_dir, tiny_adapters
):
    """One CUDA batch: a seeded top-p row twice (same tokens), penalties and logprobs, and greedy rows
    for the base and an adapter that equal HF / PEFT generate."""
    handle = _load(cuda_engine, tiny_base_dir, tiny_adapters, "all8")
    n = 10
    seeded = SamplingParams(max_tokens=n, temperature=0.9, top_p=0.9, top_k=50, seed=1234, logprobs=2)
    penalized = SamplingParams(
        max_tokens=n, temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5
    )
    greedy = SamplingParams(max_tokens=n, temperature=0.0)
    results = _run(
        cuda_engine,
        [
            (PROMPTS[0], seeded, None),
            (PROMPTS[0], seeded, None),
            (PROMPTS[1], penalized, handle),
            (PROMPTS[2], greedy, None),
            (PROMPTS[1], greedy, handle),
        ],
    )
    (first, first_last), (second, _), (penalized_tokens, _), (base, _), (adapter, _) = results
    assert first == second and len(first) == n
    assert first_last.finish_reason == "length" and first_last.error is None
    assert len(set(penalized_tokens)) > 1
    assert base == peft_greedy(tiny_base_dir, None, PROMPTS[2], n)
    assert adapter == peft_greedy(tiny_base_dir, tiny_adapters / "all8", PROMPTS[1], n)
