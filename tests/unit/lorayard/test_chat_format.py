import pytest

from lorayard.chat_format import ChatFormatError, render_conversation, render_prompt, stop_token_ids

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
