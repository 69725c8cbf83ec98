"""One request's failure is that request's alone: bad ids are refused at submit, a row whose sampling
or forward fails finishes alone with an error, and the engine keeps serving."""

import asyncio
import uuid

import pytest

from lorayard.server.engine.types import InvalidRequest, Request, SamplingParams

from ..conftest import peft_greedy
from .test_engine import PROMPTS, _collect, _load

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def _request(prompt, params=GREEDY, adapter=None):
    return Request(uuid.uuid4().hex, prompt, params, adapter)


@pytest.mark.parametrize(
    ("field", "prompt", "params"),
    [
        ("prompt_ids", [1, 49152], GREEDY),
        ("prompt_ids", [1, -1], GREEDY),
        ("prompt_ids", [], GREEDY),
        (
            "stop_token_ids",
            [1, 2],
            SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=frozenset({10**9})),
        ),
        ("stop_token_ids", [1, 2], SamplingParams(max_tokens=4, stop_token_ids=frozenset({-1}))),
        ("logit_bias", [1, 2], SamplingParams(max_tokens=4, logit_bias=((49152, 5.0),))),
        ("logit_bias", [1, 2], SamplingParams(max_tokens=4, logit_bias=((-3, 5.0),))),
        ("logprobs", [1, 2], SamplingParams(max_tokens=4, logprobs=49153)),
        ("prompt_logprobs", [1, 2], SamplingParams(max_tokens=4, prompt_logprobs=-1)),
        ("max_tokens", [1, 2], SamplingParams(max_tokens=-1)),
    ],
)
def test_submit_refuses_what_would_index_outside_the_logits(engine, field, prompt, params):
    assert engine.vocab_size == 49152
    with pytest.raises(InvalidRequest) as refused:
        engine.submit(_request(prompt, params))
    assert refused.value.param == field
    assert field.split("_")[0] in str(refused.value)


def test_a_row_whose_sampling_raises_fails_alone(engine, tiny_base_dir):
    """The issue's attack (a stop id of 1e9 with min_tokens, which indexes the logits out of range) put
    past submit's guard as if a validator missed it, and a NaN temperature (which submit lets through:
    sampling raises on it) run beside an innocent request: the innocent one gets exactly its greedy
    tokens, the two hostile ones an error each, and the engine serves the next request."""
    hostile_stop = SamplingParams(
        max_tokens=8, min_tokens=2, stop_token_ids=frozenset({10**9}), temperature=0.0
    )
    nan_temperature = SamplingParams(max_tokens=8, temperature=float("nan"))
    innocent = _request(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0.0))

    async def run():
        streams = [
            engine._enqueue(_request(PROMPTS[1], hostile_stop)),  # past the guard on purpose
            engine.submit(_request(PROMPTS[2], nan_temperature)),
            engine.submit(innocent),
        ]
        engine.start()  # all three are admitted and prefilled in the same step
        results = [[e async for e in stream] for stream in streams]
        after = await _collect(engine, _request(PROMPTS[1]))
        return results, after

    (stop_events, nan_events, innocent_events), (after_tokens, _) = asyncio.run(run())
    for events, cause in ((stop_events, "IndexError"), (nan_events, "RuntimeError")):
        assert events[-1].finish_reason == "abort"
        assert cause in events[-1].error and "sampling failed" in events[-1].error
    assert [e.token_id for e in innocent_events] == peft_greedy(tiny_base_dir, None, PROMPTS[0], 20)
    assert innocent_events[-1].finish_reason == "length" and innocent_events[-1].error is None
    assert after_tokens == peft_greedy(tiny_base_dir, None, PROMPTS[1], 12)
    engine.check_kv()  # every block back: none leaked by the failed rows


@pytest.mark.parametrize("decode_mode", ["eager", "static"])
def test_a_failing_forward_fails_only_its_rows(make_engine, decode_mode, tiny_base_dir, tiny_adapters):
    """An adapter's weights vanish while its request decodes in a mixed batch (a registry bug): the
    decode forward raises, the engine retries in halves, and only that request fails; the rows
    beside it (base and another adapter) finish with exactly PEFT's greedy tokens. A new request on
    the vanished adapter fails in its prefill alone, and the engine keeps serving. With the static
    decode step the vanished adapter leaves the stack too: its passes run packed and fail there."""
    engine = make_engine(max_batch_size=8, max_model_len=256, decode_mode=decode_mode)
    doomed = _load(engine, tiny_base_dir, tiny_adapters, "qv4")
    other = _load(engine, tiny_base_dir, tiny_adapters, "all8")

    async def run():
        engine.start()
        doomed_stream = engine.submit(
            _request(PROMPTS[0], SamplingParams(max_tokens=240, temperature=0.0), doomed)
        )
        long = SamplingParams(max_tokens=100, temperature=0.0)  # still decoding when the forward fails
        base = asyncio.create_task(_collect(engine, _request(PROMPTS[1], long)))
        adapted = asyncio.create_task(_collect(engine, _request(PROMPTS[2], long, other)))
        first = await doomed_stream.__anext__()
        engine.free_adapter_weights(doomed.slot)
        doomed_events = [first] + [e async for e in doomed_stream]
        results = await asyncio.gather(base, adapted)
        prefill_fail = await _collect(engine, _request(PROMPTS[1], adapter=doomed))
        after = await _collect(engine, _request(PROMPTS[0]))
        return doomed_events, results, prefill_fail, after

    doomed_events, (base, adapted), (_, prefill_last), (after_tokens, _) = asyncio.run(run())
    assert doomed_events[-1].finish_reason == "abort"
    assert "decode failed: KeyError" in doomed_events[-1].error
    assert doomed_events[-1].output_tokens < 240
    assert base[0] == peft_greedy(tiny_base_dir, None, PROMPTS[1], 100)
    assert adapted[0] == peft_greedy(tiny_base_dir, tiny_adapters / "all8", PROMPTS[2], 100)
    assert base[1].error is None and adapted[1].error is None
    assert prefill_last.finish_reason == "abort" and "prefill failed: KeyError" in prefill_last.error
    assert after_tokens == peft_greedy(tiny_base_dir, None, PROMPTS[0], 12)
    engine.check_kv()  # every block back: none leaked by the failed rows
