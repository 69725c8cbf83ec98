"""Our sampling params -> vLLM's keyword arguments (no vLLM needed): every field, the end-of-turn
rule, scoring, structured output's grammar, refusals by name."""

from __future__ import annotations

import pytest
import xgrammar

from lorayard.server.engine.types import GuidedDecoding, InvalidRequest, SamplingParams
from lorayard.server.engine_vllm.sampling import MAX_LOGPROBS, sampling_kwargs

EOS = frozenset({2, 7})


def test_every_field_maps_to_vllms_field_of_the_same_meaning():
    params = SamplingParams(
        max_tokens=9,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_tokens=3,
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.1,
        logprobs=2,
        prompt_logprobs=1,
        logit_bias=((5, -100.0), (6, 3.0)),
        stop_token_ids=frozenset({42}),
    )
    kwargs = sampling_kwargs(params, EOS)
    assert kwargs == {
        "n": 1,
        "max_tokens": 9,
        "min_tokens": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 11,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "stop_token_ids": [2, 7, 42],
        "logprobs": 2,
        "prompt_logprobs": 1,
        "logit_bias": {5: -100.0, 6: 3.0},
        "detokenize": False,
    }


def test_ignore_eos_drops_our_end_of_turn_ids_but_keeps_the_requests_own():
    kwargs = sampling_kwargs(
        SamplingParams(max_tokens=4, ignore_eos=True, stop_token_ids=frozenset({42})), EOS
    )
    assert kwargs["stop_token_ids"] == [42] and kwargs["ignore_eos"] is True


def test_scoring_asks_vllm_for_one_token():
    assert sampling_kwargs(SamplingParams(max_tokens=0, prompt_logprobs=0), EOS)["max_tokens"] == 1


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_more_alternatives_than_vllm_returns_are_refused_by_name(field):
    with pytest.raises(InvalidRequest) as refused:
        sampling_kwargs(SamplingParams(max_tokens=4, **{field: MAX_LOGPROBS + 1}), EOS)
    assert refused.value.param == field


def test_structured_output_is_our_grammar_as_ebnf_that_xgrammar_reads_back():
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
    for guided in (GuidedDecoding("json_schema", schema), GuidedDecoding("json_object")):
        grammar = sampling_kwargs(SamplingParams(max_tokens=4, guided=guided), EOS)["structured_outputs"][
            "grammar"
        ]
        reparsed = xgrammar.Grammar.from_ebnf(grammar)
        assert str(reparsed) == grammar
