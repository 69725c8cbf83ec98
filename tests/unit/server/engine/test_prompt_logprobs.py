"""Prompt logprobs come from the engine's own prefill, with the request's adapter, across chunks, and
equal the log-softmax of the HF / PEFT forward."""

import asyncio
import uuid

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorayard.server.engine.types import Request, SamplingParams

from ..conftest import peft_greedy
from .test_engine import PROMPTS, _load

LONG_PROMPT = [(i * 37) % 5000 + 3 for i in range(40)]
TOP = 3


def _reference_logprobs(base_dir, adapter_dir, prompt):
    """[len(prompt), vocab]: row i is the model's log-distribution after prompt[: i + 1]."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)


def _assert_matches(prompt_logprobs, reference, prompt):
    assert len(prompt_logprobs) == len(prompt)
    assert prompt_logprobs[0] is None
    for i, entry in enumerate(prompt_logprobs[1:], start=1):
        row = reference[i - 1]
        assert entry.logprob == pytest.approx(float(row[prompt[i]]), abs=1e-4), i
        best = torch.topk(row, TOP)
        assert [t.token_id for t in entry.top_logprobs] == best.indices.tolist(), i
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)


async def _events(engine, request):
    return [event async for event in engine.submit(request)]


@pytest.mark.parametrize("chunk", [256, 7], ids=["one-chunk", "chunk-7"])
def test_prompt_logprobs_equal_the_models_log_softmax(engine, chunk, tiny_base_dir, tiny_adapters):
    """Base and adapter rows prefilled side by side, in one chunk and in chunks of 7 (so a chunk's last
    logits score the next chunk's first token): every prompt token's logprob and top alternatives
    equal PEFT's; max_tokens 0 finishes after the prefill with "length" and no token; a request that
    also generates carries them on its first event and its tokens are still the greedy ones."""
    engine.scheduler.prefill_chunk = engine.scheduler.idle_prefill_chunk = chunk
    handle = _load(engine, tiny_base_dir, tiny_adapters, "all8")
    score = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=TOP)
    generate = SamplingParams(max_tokens=5, temperature=0.0, prompt_logprobs=TOP)
    cases = [
        (None, LONG_PROMPT, score),
        ("all8", LONG_PROMPT, score),
        ("all8", PROMPTS[0], generate),
        (None, PROMPTS[2], SamplingParams(max_tokens=5, temperature=0.0)),  # asks for none
    ]

    async def run():
        engine.start()
        requests = [
            Request(uuid.uuid4().hex, prompt, params, handle if name else None)
            for name, prompt, params in cases
        ]
        return await asyncio.gather(*(_events(engine, r) for r in requests))

    results = asyncio.run(run())
    for (name, prompt, params), events in zip(cases, results, strict=True):
        adapter_dir = tiny_adapters / name if name else None
        first, last = events[0], events[-1]
        if params.prompt_logprobs is None:
            assert all(e.prompt_logprobs is None for e in events)
            continue
        _assert_matches(
            first.prompt_logprobs, _reference_logprobs(tiny_base_dir, adapter_dir, prompt), prompt
        )
        assert all(e.prompt_logprobs is None for e in events[1:])
        if params.max_tokens == 0:
            assert events == [first]
            assert first.token_id is None and first.finish_reason == "length" and first.output_tokens == 0
        else:
            tokens = [e.token_id for e in events]
            assert tokens == peft_greedy(tiny_base_dir, adapter_dir, prompt, params.max_tokens)
            assert last.finish_reason == "length"
    base_scores = [p.logprob for p in results[0][0].prompt_logprobs[1:]]
    adapter_scores = [p.logprob for p in results[1][0].prompt_logprobs[1:]]
    assert base_scores != pytest.approx(adapter_scores, abs=1e-3), "the adapter must change the scores"
