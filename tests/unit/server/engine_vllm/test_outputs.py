"""vLLM's delta outputs -> our token events (no vLLM needed: its output objects are plain records,
built here with the fields vLLM fills)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorayard.server.engine.types import PromptLogprob, TopLogprob
from lorayard.server.engine_vllm.outputs import OutputTracker, prompt_logprobs, top_logprobs


@dataclass
class Logprob:
    logprob: float
    rank: int | None


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None


@dataclass
class Output:
    outputs: list[Completion]
    finished: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    extra: dict = field(default_factory=dict)


def test_top_logprobs_are_ranked_and_leave_out_the_chosen_token_past_k_and_minus_inf():
    entry = {9: Logprob(-5.0, 7), 1: Logprob(-0.1, 1), 2: Logprob(-2.0, 2), 3: Logprob(float("-inf"), 3)}
    assert top_logprobs(entry, 3) == (TopLogprob(1, -0.1), TopLogprob(2, -2.0))
    assert top_logprobs(entry, 0) == ()


def test_prompt_logprobs_score_each_prompt_token_none_first():
    entries = [None, {5: Logprob(-1.5, 3), 4: Logprob(-0.2, 1)}]
    assert prompt_logprobs(entries, [3, 5], 1) == (None, PromptLogprob(-1.5, (TopLogprob(4, -0.2),)))


def test_merged_deltas_become_one_event_per_token_finishing_on_the_last():
    tracker = OutputTracker([1, 2, 3], logprobs=None, prompt_top=None, scoring=False)
    first = list(tracker.events(Output([Completion([10])], num_cached_tokens=0)))
    rest = list(tracker.events(Output([Completion([11, 12], finish_reason="stop")], finished=True)))
    assert [e.token_id for e in first + rest] == [10, 11, 12]
    assert [e.output_tokens for e in first + rest] == [1, 2, 3]
    assert [e.finish_reason for e in first + rest] == [None, None, "stop"]
    assert all(e.prompt_tokens == 3 for e in first + rest)


def test_scoring_drops_vllms_one_token_and_finishes_length_with_the_prompts_logprobs():
    tracker = OutputTracker([3, 5], logprobs=None, prompt_top=0, scoring=True)
    output = Output(
        [Completion([77], finish_reason="length")],
        finished=True,
        prompt_logprobs=[None, {5: Logprob(-1.5, 2)}],
    )
    (event,) = tracker.events(output)
    assert event.token_id is None and event.finish_reason == "length" and event.output_tokens == 0
    assert event.prompt_logprobs == (None, PromptLogprob(-1.5, ()))


def test_an_unknown_finish_reason_is_an_abort():
    tracker = OutputTracker([1], logprobs=None, prompt_top=None, scoring=False)
    (event,) = tracker.events(Output([Completion([], finish_reason="error")], finished=True))
    assert event.finish_reason == "abort" and event.token_id is None
