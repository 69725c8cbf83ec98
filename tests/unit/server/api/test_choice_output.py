"""One choice's token state without an engine or a server: token events in, text deltas out."""

from __future__ import annotations

import pytest

from lorayard.server.api.errors import EngineFailed
from lorayard.server.api.generation import ChoiceOutput
from lorayard.server.engine.types import PromptLogprob, TokenEvent

EOT = 0
PIECES = {
    EOT: "<eot>",
    1: "Hel",
    2: "lo",
    3: " wor",
    4: "ld",
    5: "!",
    6: b"\xe6\x97".decode("latin-1"),
    7: ".",
}


class PieceTokenizer:
    """Each id one piece of text; ``<eot>`` special (skipped, as the real detokenizer skips it)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(PIECES[i] for i in ids if not (skip_special_tokens and i == EOT))


def _run(events: list[TokenEvent], stops: list[str] = ()) -> tuple[list, ChoiceOutput]:
    """Feed events until the choice finishes, as Generation does."""
    output = ChoiceOutput(0, PieceTokenizer(), list(stops))
    deltas = []
    for event in events:
        delta = output.add(event)
        if delta is not None:
            deltas.append(delta)
            if delta.finish_reason is not None:
                break
    return deltas, output


def _tokens(*ids: int, finish: str = "stop", logprob: float | None = None) -> list[TokenEvent]:
    events = [TokenEvent(i, logprob) for i in ids[:-1]]
    return [*events, TokenEvent(ids[-1], logprob, finish_reason=finish, output_tokens=len(ids))]


def test_text_streams_and_the_end_of_turn_token_is_not_text():
    deltas, _ = _run(_tokens(1, 2, 3, 4, EOT))
    assert "".join(d.text for d in deltas) == "Hello world"
    assert [d.finish_reason for d in deltas][-1] == "stop" and all(
        d.finish_reason is None for d in deltas[:-1]
    )


def test_a_length_finish_keeps_its_last_token():
    deltas, _ = _run(_tokens(1, 2, 5, finish="length"))
    assert "".join(d.text for d in deltas) == "Hello!" and deltas[-1].finish_reason == "length"


def test_a_stop_string_across_tokens_cuts_and_finishes_before_the_engine():
    events = _tokens(1, 2, 3, 4, 5, EOT, finish="length")
    deltas, output = _run(events, stops=["o w"])
    assert "".join(d.text for d in deltas) == "Hell"
    # finished at " wor" (the third token), where the engine had not: Generation aborts its row
    assert deltas[-1].finish_reason == "stop" and output.stopped_by_string


def test_logprob_offsets_follow_the_text():
    deltas, _ = _run(_tokens(1, 2, 3, EOT, logprob=-0.5))
    offsets = [(e.token_id, e.text_offset) for d in deltas for e in d.logprobs]
    # the end-of-turn token adds no text but keeps its entry (scorers count on it), at the text's end
    assert offsets == [(1, 0), (2, 3), (3, 5), (EOT, 9)]


def test_prompt_logprobs_ride_on_the_first_delta_only():
    first = PromptLogprob(-1.0)
    events = [TokenEvent(None, prompt_logprobs=(None, first)), *_tokens(1, 2, finish="length")]
    deltas, _ = _run(events)
    assert deltas[0].prompt_logprobs == (None, first)
    assert all(d.prompt_logprobs is None for d in deltas[1:-1])


def test_an_abort_finishes_as_stop_and_an_engine_error_raises():
    deltas, _ = _run([TokenEvent(1), TokenEvent(None, finish_reason="abort")])
    assert deltas[-1].finish_reason == "stop" and "".join(d.text for d in deltas) == "Hel"
    with pytest.raises(EngineFailed):
        _run([TokenEvent(None, finish_reason="abort", error="boom")])
