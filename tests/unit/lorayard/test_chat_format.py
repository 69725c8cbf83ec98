import pytest

from lorayard.chat_format import (
    ChatFormatError,
    ToolContext,
    render_conversation,
    render_prompt,
    stop_token_ids,
)
from lorayard.server.api.tool_calls import ToolCallParser
from lorayard.tool_format import (
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    ToolFormatConflict,
    UnknownToolFormat,
    tool_format_for_template,
    version_tool_format,
)

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 日本 🍣"},
    {"role": "assistant", "content": "Tokyo 東京 🗼"},
]


def test_training_prompt_is_the_serving_prompt(real_tokenizer):
    example = render_conversation(real_tokenizer, CONVERSATION)
    for turn in (1, 3):
        served = render_prompt(real_tokenizer, CONVERSATION[:turn])
        # The ids the server sends for this turn are exactly the start of the training example ...
        assert example.ids[: len(served)] == served
    # ... and the full serving prompt of the last turn is a prefix too, token for token.
    last_prompt = render_prompt(real_tokenizer, CONVERSATION[:3])
    assert example.ids[: len(last_prompt)] == last_prompt
    assert example.labels_mask[len(last_prompt) - 1] == 0
    assert example.labels_mask[len(last_prompt)] == 1


def test_only_assistant_turns_and_their_end_of_turn_are_trained(real_tokenizer):
    example = render_conversation(real_tokenizer, CONVERSATION)
    trained = [i for i, m in zip(example.ids, example.labels_mask, strict=True) if m]
    text = real_tokenizer.decode(trained)
    assert text == "Paris.<|im_end|>Tokyo 東京 🗼<|im_end|>"
    stops = stop_token_ids(real_tokenizer)
    assert sum(1 for i in trained if i in stops) == 2


def test_default_system_prompt_is_kept(real_tokenizer):
    text = real_tokenizer.decode(render_prompt(real_tokenizer, CONVERSATION[:1]))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "empty"),
        ([{"role": "robot", "content": "x"}], "role"),
        ([{"role": "user", "content": 3}], "content"),
    ],
)
def test_bad_messages_name_the_problem(real_tokenizer, messages, problem):
    with pytest.raises(ChatFormatError, match=problem):
        render_prompt(real_tokenizer, messages)


def test_training_needs_an_assistant_turn(real_tokenizer):
    with pytest.raises(ChatFormatError, match="assistant"):
        render_conversation(real_tokenizer, CONVERSATION[:1])


# -- tools -----------------------------------------------------------------------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_ROUND_TRIP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "rain"},
    {"role": "assistant", "content": "Paris is sunny, Rome rainy."},
]


def test_default_tool_format_on_a_template_without_tools(real_tokenizer):
    """SmolLM2's template knows no tools: schemas join the system turn, calls are Hermes text (JSON
    re-serialised one way), both results come back as one user turn."""
    tools = ToolContext((WEATHER,))
    text = real_tokenizer.decode(render_prompt(real_tokenizer, TOOL_ROUND_TRIP[:5], tools=tools))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    calls = (
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
    )
    assert calls in text
    results = (
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
    )
    assert results in text and text.endswith("<|im_start|>assistant\n")


def test_a_plain_chat_renders_as_before_when_tools_are_absent(real_tokenizer):
    plain = render_prompt(real_tokenizer, CONVERSATION[:3])
    assert plain == render_prompt(real_tokenizer, CONVERSATION[:3], tools=ToolContext())


def test_tool_calls_are_trained_with_the_serving_prompt(real_tokenizer):
    """Training a tool conversation: the call turn and the answer are trained, their prompts are the
    serving prompts (tools included), the tool results are not trained."""
    tools = ToolContext((WEATHER,))
    example = render_conversation(real_tokenizer, TOOL_ROUND_TRIP, tools=tools)
    for turn in (2, 5):
        served = render_prompt(real_tokenizer, TOOL_ROUND_TRIP[:turn], tools=tools)
        assert example.ids[: len(served)] == served
        assert example.labels_mask[len(served) - 1] == 0 and example.labels_mask[len(served)] == 1
    trained = real_tokenizer.decode([i for i, m in zip(example.ids, example.labels_mask, strict=True) if m])
    assert trained.startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert "<tool_response>" not in trained and trained.endswith("Paris is sunny, Rome rainy.<|im_end|>")


QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTOOLS:"
    "{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{%- for c in m.tool_calls %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_a_template_with_tools_support_renders_them_itself(real_tokenizer):
    """The template's own tools support is used (arguments handed over as objects, as HF templates
    expect), and its call format is recognised as Hermes."""
    tools = ToolContext((WEATHER,), tool_format_for_template(QWEN_STYLE_TEMPLATE))
    assert tools.format is HERMES
    ids = render_prompt(real_tokenizer, TOOL_ROUND_TRIP[:4], QWEN_STYLE_TEMPLATE, tools=tools)
    text = real_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nTOOLS:get_weather;<|im_end|>")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text


def test_tool_formats_from_templates_and_the_override():
    assert tool_format_for_template(None) is HERMES  # no template: our default
    assert tool_format_for_template("{{ messages }}") is HERMES  # no tools support: our default
    assert tool_format_for_template("{{ tools }}<|python_tag|>") is LLAMA3_JSON
    # The flag chooses the format of a template without tools, or one we do not recognise...
    assert tool_format_for_template("{{ messages }}", "llama3_json") is LLAMA3_JSON
    assert tool_format_for_template("{{ tools }}<function=", "llama3_json") is LLAMA3_JSON
    assert tool_format_for_template("{{ tools }}<tool_call>", "hermes") is HERMES
    assert tool_format_for_template("{{ tools }}[TOOL_CALLS]{{ name }}[ARGS]{{ args }}") is MISTRAL
    # ...never one a template writes itself: rendered one way, its calls would be parsed another.
    with pytest.raises(ToolFormatConflict, match="'hermes' format, which --tool-call-format mistral"):
        tool_format_for_template("{{ tools }}<tool_call>", "mistral")
    # Mistral's older spellings are refused by name, never parsed as another format.
    with pytest.raises(UnknownToolFormat, match="JSON list after"):
        tool_format_for_template("{{ tools }}[TOOL_CALLS] [{{ calls }}]")
    with pytest.raises(UnknownToolFormat, match=r"\[CALL_ID\]"):
        tool_format_for_template("{{ tools }}[TOOL_CALLS]{{ n }}[CALL_ID]{{ id }}[ARGS]{{ a }}")
    with pytest.raises(UnknownToolFormat, match="--tool-call-format"):
        tool_format_for_template("{{ tools }}<function=")
    with pytest.raises(UnknownToolFormat, match="unknown"):
        tool_format_for_template(None, "pythonic")


def test_an_adapter_version_serves_in_the_format_it_was_trained_in():
    assert version_tool_format(None, None, MISTRAL) is MISTRAL  # none recorded: the base's
    assert version_tool_format(None, "hermes", HERMES) is HERMES
    assert version_tool_format("llama3_json", None, HERMES) is LLAMA3_JSON  # the manifest's wins
    assert version_tool_format("hermes", "hermes", HERMES) is HERMES
    with pytest.raises(
        ToolFormatConflict, match=r"trained with tool-call format 'llama3_json'.*forces 'hermes'"
    ):
        version_tool_format("llama3_json", "hermes", HERMES)
    with pytest.raises(ToolFormatConflict, match="does not know"):
        version_tool_format("pythonic", None, HERMES)


@pytest.mark.parametrize(
    ("family", "fmt", "calls"), [("mistral", MISTRAL, 2), ("llama3", LLAMA3_JSON, 1), ("qwen", HERMES, 2)]
)
def test_a_native_tool_template_trains_the_calls_the_server_parses(tool_family_base, family, fmt, calls):
    """A base whose own template writes calls (Mistral v11+ with ``[TOOL_CALLS]`` a special token;
    Llama 3.1's JSON, Meta's template taking one call a turn; Qwen 2.5's Hermes ``<tool_call>``): its
    format is recognised, training puts exactly the format's call text in the loss, the parser reads
    it back as the calls that were rendered, and the serving prompt of the turn that calls is the
    start of the training example."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tool_family_base(family))
    assert tool_format_for_template(tokenizer.chat_template) is fmt
    conversation = [
        *TOOL_ROUND_TRIP[:2],
        _first_calls(calls),
        *TOOL_ROUND_TRIP[3 : 3 + calls],
        TOOL_ROUND_TRIP[5],
    ]
    tools = ToolContext((WEATHER,), fmt)
    example = render_conversation(tokenizer, conversation, tools=tools)
    trained = tokenizer.decode([i for i, m in zip(example.ids, example.labels_mask, strict=True) if m])
    cities = ["Paris", "Rome"][:calls]
    call_text = fmt.separator.join(fmt.render_call("get_weather", f'{{"city": "{c}"}}') for c in cities)
    eos = tokenizer.eos_token
    assert trained == f"{call_text}{eos}{conversation[-1]['content']}{eos}"
    parser = ToolCallParser(fmt, ("get_weather",))
    parser.push(call_text)
    parser.finish()
    assert parser.content == "" and [c.arguments for c in parser.calls] == [
        f'{{"city": "{c}"}}' for c in cities
    ]
    served = render_prompt(tokenizer, conversation[:2], tools=tools)  # the turn that calls
    assert example.ids[: len(served)] == served and example.labels_mask[len(served)] == 1


def _first_calls(count: int) -> dict:
    turn = dict(TOOL_ROUND_TRIP[2])
    turn["tool_calls"] = turn["tool_calls"][:count]
    return turn


def test_only_assistant_messages_carry_tool_calls(real_tokenizer):
    bad = [{"role": "user", "content": "x", "tool_calls": TOOL_ROUND_TRIP[2]["tool_calls"]}]
    with pytest.raises(ChatFormatError, match=r"messages\[0\].tool_calls"):
        render_prompt(real_tokenizer, bad)
