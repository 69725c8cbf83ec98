"""The streaming detokenizer and stop-string filter, property-based: any text, any split."""

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorayard.server.api.streaming import IncrementalDetokenizer, StopStringFilter

# Any Unicode text but: the replacement character itself (its presence is how incomplete bytes show),
# surrogates (not encodable as UTF-8), and unassigned and private-use code points (the tokenizer's own
# decode turns them into U+FFFD, so no detokenizer could give them back).
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cn", "Co"), blacklist_characters="\ufffd"),
    max_size=40,
)
MIXED = st.lists(
    st.sampled_from(["héllo", " 世界", "🙂", "👩‍👩‍👧", "Ωmega", " ", "\n", "a", "日本語のテキスト", "é"]),
    max_size=12,
).map("".join)
"""Multi-byte characters a byte-level tokenizer splits over several tokens, more often than TEXT."""

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _stream(tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.add(i) for i in ids]


@PROPERTY
@given(text=st.one_of(TEXT, MIXED))
def test_deltas_add_up_to_the_full_decode_and_never_split_a_character(real_tokenizer, text):
    ids = real_tokenizer.encode(text, add_special_tokens=False)
    deltas = _stream(real_tokenizer, ids)
    assert "".join(deltas) == real_tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)


@PROPERTY
@given(pieces=st.lists(st.one_of(TEXT, MIXED), min_size=1, max_size=4))
def test_tokens_of_separately_encoded_pieces_stream_to_their_decode(real_tokenizer, pieces):
    # Token boundaries a single encode would not pick (a model may emit any sequence).
    ids = [i for piece in pieces for i in real_tokenizer.encode(piece, add_special_tokens=False)]
    deltas = _stream(real_tokenizer, ids)
    assert "".join(deltas) == real_tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)


def test_a_character_split_over_tokens_comes_out_whole(real_tokenizer):
    ids = real_tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1, "the premise: a byte-level tokenizer splits the emoji"
    deltas = _stream(real_tokenizer, ids)
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🙂"


@PROPERTY
@given(text=MIXED, cut=st.integers(min_value=1, max_value=40))
def test_a_cut_output_flushes_what_it_held_back(real_tokenizer, text, cut):
    """max_tokens can end the output inside a character: what was held back comes out at the end, as
    the tokenizer decodes it (U+FFFD for the missing bytes), never dropped."""
    ids = real_tokenizer.encode(text, add_special_tokens=False)[:cut]
    detok = IncrementalDetokenizer(real_tokenizer)
    streamed = "".join(detok.add(i) for i in ids) + detok.flush()
    assert streamed == real_tokenizer.decode(ids, skip_special_tokens=True)
    assert detok.flush() == ""


def test_half_an_emoji_at_the_end_is_a_replacement_character(real_tokenizer):
    ids = real_tokenizer.encode("ok🙂", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(real_tokenizer)
    assert "".join(detok.add(i) for i in ids) == "ok"
    assert detok.flush().endswith("\ufffd")


def test_special_tokens_are_skipped(real_tokenizer):
    ids = [*real_tokenizer.encode("hi", add_special_tokens=False), real_tokenizer.eos_token_id]
    assert "".join(_stream(real_tokenizer, ids)) == "hi"


@st.composite
def _split(draw, text: str) -> list[str]:
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), text=TEXT, stops=st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_stop_filter_sends_exactly_the_text_before_the_first_stop(data, text, stops):
    chunks = data.draw(_split(text))
    stop_filter = StopStringFilter(stops)
    sent = "".join(stop_filter.push(chunk) for chunk in chunks)
    expected, hit = _before_first_completed_stop(chunks, stops)
    if not stop_filter.stopped:
        sent += stop_filter.flush()
    assert sent == expected
    assert stop_filter.stopped == hit


def _before_first_completed_stop(chunks: list[str], stops: list[str]) -> tuple[str, bool]:
    """The reference: generation stops at the first chunk (token) after which the text contains a
    stop string, and the output ends before the earliest of the stops it then contains. (Stops "0"
    and "100" over "1", "0", "0": "0" completes first, so the output is "1", although "100" starts
    earlier in the whole text: generation never got that far.)"""
    text = ""
    for chunk in chunks:
        text += chunk
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[: min(hits)], True
    return text, False


def test_stop_spanning_chunks_is_held_back_then_cut():
    stop_filter = StopStringFilter(["STOP"])
    assert stop_filter.push("abc ST") == "abc"
    assert stop_filter.push("OP and more") == " "
    assert stop_filter.stopped
    assert stop_filter.push("ignored") == ""


@pytest.mark.parametrize("chunks", [["no stops at all"], ["", "a", "", "b"]])
def test_without_stops_everything_goes_through_at_once(chunks):
    stop_filter = StopStringFilter([])
    assert [stop_filter.push(c) for c in chunks] == chunks
