"""Tool calls without a server: the grammar accepts exactly well-formed calls, the parser turns output
text (however it is chunked) into content and calls, streamed and whole alike."""

import json

import pytest
import xgrammar

from lorayard.server.api.errors import APIError
from lorayard.server.api.protocol import NamedToolChoice, Tool
from lorayard.server.api.streaming import IncrementalDetokenizer
from lorayard.server.api.tool_calls import (
    ArgumentsDelta,
    CallStarted,
    ContentDelta,
    ToolCallParser,
    marker_token_ids,
    tool_calling,
    tool_grammar,
)
from lorayard.server.engine.guided import GuidedCompiler
from lorayard.tool_format import HERMES, LLAMA3_JSON, MISTRAL

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
N = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
TOOLS = [
    Tool.model_validate({"type": "function", "function": {"name": "weather", "parameters": CITY}}),
    Tool.model_validate({"type": "function", "function": {"name": "count", "parameters": N}}),
]
ANSWER = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def _calling(choice="auto", parallel=None, fmt=HERMES):
    calling = tool_calling(TOOLS, choice, parallel, fmt)
    assert calling is not None
    return calling


def _parse(text: str, chunks: list[int], fmt=HERMES, names=("weather", "count")):
    """Push ``text`` cut at ``chunks``; return the events and the parser."""
    parser = ToolCallParser(fmt, names)
    events, at = [], 0
    for cut in [*chunks, len(text)]:
        events += parser.push(text[at:cut])
        at = cut
    return events + parser.finish(), parser


TWO_CALLS = (
    'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "count", "arguments": {"n": 3}}\n</tool_call>'
)


@pytest.mark.parametrize("chunks", [[], list(range(1, len(TWO_CALLS))), [5, 14, 20, 33, 60, 61, 90, 110]])
def test_content_then_parallel_calls_however_chunked(chunks):
    events, parser = _parse(TWO_CALLS, chunks)
    assert parser.content == "Let me check."  # the newline before the call is the format's
    assert [(c.name, json.loads(c.arguments), c.complete) for c in parser.calls] == [
        ("weather", {"city": "Paris"}, True),
        ("count", {"n": 3}, True),
    ]
    streamed_content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert streamed_content == parser.content and "<tool_call>" not in streamed_content
    for index, call in enumerate(parser.calls):
        started = [e for e in events if isinstance(e, CallStarted) and e.index == index]
        args = "".join(e.text for e in events if isinstance(e, ArgumentsDelta) and e.index == index)
        assert [s.name for s in started] == [call.name] and args == call.arguments


def test_plain_answer_is_all_content_whitespace_and_near_triggers_included():
    text = "A <tool is not a call.\n\n"
    events, parser = _parse(text, list(range(1, len(text))))
    assert parser.content == text and not parser.calls
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == text


def test_a_call_cut_by_max_tokens_is_still_a_call():
    _, parser = _parse('<tool_call>\n{"name": "weather", "arguments": {"ci', [])
    (call,) = parser.calls
    assert (call.name, call.arguments, call.complete) == ("weather", '{"ci', False)
    _, parser = _parse('<tool_call>\n{"name": "wea', [])  # cut in the name: the only tool it can be
    assert [(c.name, c.arguments) for c in parser.calls] == [("weather", "")]
    _, parser = _parse('<tool_call>\n{"name": "', [])  # two tools fit: not a call we can name
    assert not parser.calls and parser.content == '<tool_call>\n{"name": "'


def test_llama3_json_calls():
    _, parser = _parse('{"name": "count", "parameters": {"n": 12}}', [3, 30], LLAMA3_JSON)
    assert [(c.name, c.arguments) for c in parser.calls] == [("count", '{"n": 12}')]


MISTRAL_CALLS = 'Checking.[TOOL_CALLS]weather[ARGS]{"city": "Paris"}[TOOL_CALLS]count[ARGS]{"n": 3}'


@pytest.mark.parametrize("chunks", [[], list(range(1, len(MISTRAL_CALLS))), [9, 12, 20, 27, 50, 62, 70]])
def test_mistral_calls_however_chunked(chunks):
    """Mistral v11+: each call its own ``[TOOL_CALLS]NAME[ARGS]{...}``, nothing after the arguments."""
    events, parser = _parse(MISTRAL_CALLS, chunks, MISTRAL)
    assert parser.content == "Checking."
    assert [(c.name, json.loads(c.arguments), c.complete) for c in parser.calls] == [
        ("weather", {"city": "Paris"}, True),
        ("count", {"n": 3}, True),
    ]
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Checking."


def test_a_trigger_cut_after_a_call_is_not_content():
    """max_tokens cut the next call inside its trigger: it is no call yet, and not content either."""
    cases = [
        (MISTRAL, '[TOOL_CALLS]count[ARGS]{"n": 3}[TOOL_CA', "", 1),
        (HERMES, f"{TWO_CALLS}\n<tool_", "Let me check.", 2),
    ]
    for fmt, text, content, calls in cases:
        _, parser = _parse(text, [], fmt)
        assert parser.content == content
        assert len(parser.calls) == calls and all(c.complete for c in parser.calls)


def test_mistral_markers_are_special_tokens_the_grammar_and_the_parser_see(tool_family_base):
    """``[TOOL_CALLS]`` and ``[ARGS]`` are special tokens in Mistral's tokenizers: a plain decode drops
    them, the detokenizer keeps them (so the parser sees a call start), and the grammar takes the
    special token as the trigger and as the call's own markers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tool_family_base("mistral"))
    markers = marker_token_ids(tokenizer, MISTRAL)
    assert markers == {tokenizer.convert_tokens_to_ids(t) for t in ("[TOOL_CALLS]", "[ARGS]")}
    assert marker_token_ids(tokenizer, HERMES) == frozenset()
    encode = tokenizer.encode
    ids = encode("Sure.") + encode("[TOOL_CALLS]count[ARGS]") + encode('{"n": 3}')
    assert len(ids) == len(encode("Sure.")) + 3 + len(encode('{"n": 3}'))  # each marker one token
    assert "[TOOL_CALLS]" not in tokenizer.decode(ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(tokenizer, kept=markers)
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == 'Sure.[TOOL_CALLS]count[ARGS]{"n": 3}'
    for choice in ("auto", "required"):
        compiled = GuidedCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id]).compile(
            tool_grammar(_calling(choice, fmt=MISTRAL), None)
        )
        matcher = xgrammar.GrammarMatcher(compiled)
        call = ids[len(encode("Sure.")) :] if choice == "required" else ids
        assert all(matcher.accept_token(i) for i in call)
        assert matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()


def _accepts(calling, text: str, real_tokenizer, text_schema=None) -> bool:
    compiled = GuidedCompiler(real_tokenizer, len(real_tokenizer), []).compile(
        tool_grammar(calling, text_schema)
    )
    matcher = xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_terminated()


def test_auto_grammar_lets_text_be_and_constrains_calls(real_tokenizer):
    calling = _calling()
    assert _accepts(calling, "Just text, no call.", real_tokenizer)
    assert _accepts(calling, TWO_CALLS, real_tokenizer)
    bad_args = '<tool_call>\n{"name": "count", "arguments": {"n": "three"}}\n</tool_call>'
    unknown = '<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>'
    assert not _accepts(calling, bad_args, real_tokenizer)
    assert not _accepts(calling, unknown, real_tokenizer)
    one_only = _calling(parallel=False)
    assert not _accepts(one_only, TWO_CALLS, real_tokenizer)


def test_mistral_grammars(real_tokenizer):
    """Calls in Mistral's spelling: arguments valid against their tool, one call when not parallel."""
    one = '[TOOL_CALLS]count[ARGS]{"n": 1}'
    assert _accepts(_calling(fmt=MISTRAL), "Just text.", real_tokenizer)
    assert _accepts(_calling(fmt=MISTRAL), MISTRAL_CALLS, real_tokenizer)
    assert not _accepts(_calling(fmt=MISTRAL), '[TOOL_CALLS]count[ARGS]{"n": "x"}', real_tokenizer)
    assert not _accepts(_calling("required", fmt=MISTRAL), "text", real_tokenizer)
    assert _accepts(_calling("required", fmt=MISTRAL), one, real_tokenizer)
    assert not _accepts(_calling("required", parallel=False, fmt=MISTRAL), one + one, real_tokenizer)


def test_llama3_json_grammars(real_tokenizer):
    """Llama 3's JSON calls under auto: free text, or calls whose ``parameters`` fit the tool."""
    call = '{"name": "count", "parameters": {"n": 1}}'
    assert _accepts(_calling(fmt=LLAMA3_JSON), "Just text.", real_tokenizer)
    assert _accepts(_calling(fmt=LLAMA3_JSON), f"Counting. {call}", real_tokenizer)
    assert not _accepts(
        _calling(fmt=LLAMA3_JSON), '{"name": "count", "parameters": {"n": "x"}}', real_tokenizer
    )
    assert not _accepts(_calling("required", fmt=LLAMA3_JSON), "text", real_tokenizer)
    assert _accepts(_calling("required", fmt=LLAMA3_JSON), call, real_tokenizer)


def test_required_named_and_response_format_grammars(real_tokenizer):
    call = '<tool_call>\n{"name": "count", "arguments": {"n": 1}}\n</tool_call>'
    assert not _accepts(_calling("required"), "text", real_tokenizer)
    assert _accepts(_calling("required"), call, real_tokenizer)
    named = _calling(NamedToolChoice.model_validate({"type": "function", "function": {"name": "weather"}}))
    assert not _accepts(named, call, real_tokenizer)
    # auto + response_format: calls, or a text answer valid against the format
    schema = json.dumps(ANSWER)
    assert _accepts(_calling(), call, real_tokenizer, schema)
    assert _accepts(_calling(), '{"answer": "Paris"}', real_tokenizer, schema)
    assert not _accepts(_calling(), "Paris", real_tokenizer, schema)


def test_bad_tool_requests_name_the_field():
    def param(fn):
        with pytest.raises(APIError) as info:
            fn()
        return info.value.param

    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "nope"}})
    assert param(lambda: tool_calling(TOOLS, named, None, HERMES)) == "tool_choice.function.name"
    assert param(lambda: tool_calling(None, "required", None, HERMES)) == "tool_choice"
    assert param(lambda: tool_calling([TOOLS[0], TOOLS[0]], "auto", None, HERMES)) == "tools.1.function.name"
    assert tool_calling(TOOLS, "none", None, HERMES) is None
