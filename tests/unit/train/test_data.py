"""Data: every format detected and rendered through chat_format; bad records reported with file:line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lorayard.chat_format import render_conversation, render_prompt, stop_token_ids
from lorayard.train.__main__ import EXIT_DATA, main
from lorayard.train.data import DataError, prepare_data
from lorayard.train.train import IGNORE_INDEX, CompletionDataset, PaddingCollator

USER, ANSWER = "What is the capital of France?", "Paris."
EXPECTED = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]
RECORDS = {
    "alpaca": {"instruction": USER, "input": "", "output": ANSWER},
    "text_target": {"text": USER, "target": ANSWER},
    "prompt_completion": {"prompt": USER, "completion": ANSWER},
    "messages": {"messages": EXPECTED},
    "sharegpt": {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ANSWER}]},
}


def prepare(tokenizer, files: list[Path], **overrides):
    options = {
        "val_files": [],
        "data_format": "auto",
        "max_length": 256,
        "system_prompt": None,
        "val_fraction": 0.25,
        "seed": 0,
        "max_errors": 20,
    }
    options.update(overrides)
    return prepare_data(train_files=files, tokenizer=tokenizer, **options)


def write(path: Path, rows: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_every_format_is_detected_and_rendered(tmp_path, real_tokenizer, fmt, suffix):
    file = write(tmp_path / f"{fmt}{suffix}", [RECORDS[fmt]] * 4)
    data = prepare(real_tokenizer, [file])
    assert data.formats == {str(file): fmt}
    assert len(data.train) == 3 and len(data.validation) == 1
    for example in data.train + data.validation:
        assert example.messages == EXPECTED
        assert example.rendered == render_conversation(real_tokenizer, EXPECTED)
        # The prompt trained on is the serving prompt, token for token.
        prompt = render_prompt(real_tokenizer, example.prompt_messages)
        assert example.rendered.ids[: len(prompt)] == prompt


@pytest.mark.parametrize("fmt", ["alpaca", "text_target", "prompt_completion"])
def test_flat_formats_from_csv(tmp_path, real_tokenizer, fmt):
    file = write(tmp_path / f"{fmt}.csv", [RECORDS[fmt]] * 3)
    data = prepare(real_tokenizer, [file])
    assert [e.messages for e in data.train + data.validation] == [EXPECTED] * 3


def test_alpaca_input_and_system_prompt(tmp_path, real_tokenizer):
    file = write(tmp_path / "a.jsonl", [{"instruction": "Translate.", "input": "chat", "output": "cat"}] * 2)
    data = prepare(real_tokenizer, [file], system_prompt="Be brief.")
    assert data.train[0].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate.\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]


def test_forced_format_overrides_detection(tmp_path, real_tokenizer):
    # Has both text/target and prompt/completion keys: detection picks one, the config forces the other.
    row = {"prompt": "p?", "completion": "c.", "text": "t?", "target": "g."}
    file = write(tmp_path / "both.jsonl", [row] * 2)
    data = prepare(real_tokenizer, [file], data_format="text_target")
    assert data.train[0].messages[0]["content"] == "t?"


def test_label_mask_trains_the_answer_and_its_end_of_turn_token(tmp_path, real_tokenizer):
    file = write(tmp_path / "c.jsonl", [RECORDS["messages"]] * 2)
    example = prepare(real_tokenizer, [file]).train[0]
    batch = PaddingCollator(pad_token_id=0)([CompletionDataset([example])[0]])
    trained = [
        t
        for t, label in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), strict=True)
        if label != IGNORE_INDEX
    ]
    assert real_tokenizer.decode(trained).startswith(ANSWER)
    assert trained[-1] in stop_token_ids(real_tokenizer)  # the adapter learns to stop
    assert real_tokenizer.convert_ids_to_tokens(trained[-1]) == "<|im_end|>"
    prompt_len = len(render_prompt(real_tokenizer, example.prompt_messages))
    assert (batch["labels"][0, :prompt_len] == IGNORE_INDEX).all()


BAD = {
    "alpaca": [
        {"instruction": "ok", "output": "fine"},
        {"instruction": "q"},
        {"instruction": 3, "output": "x"},
    ],
    "text_target": [
        {"text": "ok", "target": "fine"},
        {"text": "q", "target": ""},
        {"text": ["q"], "target": "a"},
    ],
    "prompt_completion": [
        {"prompt": "ok", "completion": "fine"},
        {"prompt": "q"},
        {"prompt": "q", "completion": 7},
    ],
    "messages": [
        RECORDS["messages"],
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ],
    "sharegpt": [
        RECORDS["sharegpt"],
        {"conversations": "not a list"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]},
    ],
}
BAD_PROBLEMS = {
    "alpaca": ["missing field 'output'", "'instruction' must be a string"],
    "text_target": ["'target' is empty", "'text' must be a string"],
    "prompt_completion": ["missing field 'completion'", "'completion' must be a string"],
    "messages": ["no assistant turn", "role must be one of"],
    "sharegpt": ["must be a list", "lacks 'value'"],
}


@pytest.mark.parametrize("fmt", list(BAD))
def test_bad_records_are_reported_with_file_and_line(tmp_path, real_tokenizer, fmt):
    file = write(tmp_path / f"{fmt}.jsonl", BAD[fmt])
    with pytest.raises(DataError) as caught:
        prepare(real_tokenizer, [file])
    issues = caught.value.issues
    assert [i.location for i in issues] == [f"{file}:2", f"{file}:3"]
    for issue, problem in zip(issues, BAD_PROBLEMS[fmt], strict=True):
        assert problem in issue.problem


def test_broken_json_too_long_and_wrong_type_all_listed_at_once(tmp_path, real_tokenizer):
    good = json.dumps(RECORDS["prompt_completion"])
    long = json.dumps({"prompt": "word " * 400, "completion": "a"})
    lines = [good, "{not json", long, "[1, 2]", good]
    file = tmp_path / "mixed.jsonl"
    file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        prepare(real_tokenizer, [file], max_length=128)
    found = {i.location: i.problem for i in caught.value.issues}
    assert set(found) == {f"{file}:2", f"{file}:3", f"{file}:4"}
    assert "broken JSON" in found[f"{file}:2"]
    assert "longer than max_length=128" in found[f"{file}:3"]
    assert "must be a JSON object" in found[f"{file}:4"]


def test_json_array_records_keep_their_line_numbers(tmp_path, real_tokenizer):
    file = write(tmp_path / "rows.json", [RECORDS["alpaca"], {"instruction": "q", "output": ""}])
    with pytest.raises(DataError) as caught:
        prepare(real_tokenizer, [file])
    (issue,) = caught.value.issues
    line = issue.location.rsplit(":", 1)[1]
    assert file.read_text().splitlines()[int(line) - 1].strip() == "{"
    assert int(line) > 2


def test_problem_list_is_capped(tmp_path, real_tokenizer):
    file = write(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": ""}] * 50)
    with pytest.raises(DataError) as caught:
        prepare(real_tokenizer, [file], max_errors=5)
    assert len(caught.value.issues) == 5 and caught.value.truncated


def test_split_is_seeded_and_disjoint(tmp_path, real_tokenizer):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    file = write(tmp_path / "p.jsonl", rows)
    first, again, other = (prepare(real_tokenizer, [file], seed=s) for s in (1, 1, 2))
    val = [e.source for e in first.validation]
    assert val == [e.source for e in again.validation] != [e.source for e in other.validation]
    assert len(val) == 5 and not set(val) & {e.source for e in first.train}
    (ref,) = first.datasets
    assert (ref.rows_train, ref.rows_validation) == (15, 5) and len(ref.sha256) == 64


def test_bad_data_exits_non_zero_and_publishes_nothing(tmp_path, tiny_base_dir, adapters_dir, capsys):
    files = [write(tmp_path / f"{fmt}.jsonl", BAD[fmt]) for fmt in BAD]
    code = main(
        ["--base-model", str(tiny_base_dir), "--adapters-dir", str(adapters_dir), "--name", "bad",
         "--data", *map(str, files)]
    )  # fmt: skip
    assert code == EXIT_DATA
    err = capsys.readouterr().err
    for file in files:  # every file's problems, in one report
        assert f"{file}:2" in err and f"{file}:3" in err
    assert not (adapters_dir / "bad").exists()


@pytest.fixture
def plain_tokenizer(real_tokenizer):
    """The real tokenizer without its chat template, as a raw base's tokenizer comes."""
    import copy

    tokenizer = copy.deepcopy(real_tokenizer)
    tokenizer.chat_template = None
    return tokenizer


@pytest.mark.parametrize("fmt", ["text_target", "prompt_completion"])
def test_completion_rows_on_a_template_free_base_train_raw(plain_tokenizer, tmp_path, fmt):
    """Raw prompt + completion + EOS: the prompt is exactly what /v1/completions sends for it."""
    from lorayard.chat_format import encode_text

    file = tmp_path / "rows.jsonl"
    file.write_text(json.dumps(RECORDS[fmt]) + "\n" + json.dumps(RECORDS[fmt]) + "\n")
    data = prepare(plain_tokenizer, [file], val_fraction=0.4)
    example = data.train[0]
    prompt = encode_text(plain_tokenizer, USER)
    completion = [*encode_text(plain_tokenizer, ANSWER), plain_tokenizer.eos_token_id]
    assert example.rendered.ids == prompt + completion
    assert example.rendered.labels_mask == [0] * len(prompt) + [1] * len(completion)
    assert example.prompt_ids == prompt
    assert data.prompt_template is None  # nothing for the server to apply to chat requests


def test_chat_rows_on_a_template_free_base_use_the_default_prompt_template(plain_tokenizer, tmp_path):
    from lorayard.chat_format import DEFAULT_PROMPT_TEMPLATE

    file = tmp_path / "chat.jsonl"
    file.write_text(json.dumps(RECORDS["messages"]) + "\n" + json.dumps(RECORDS["messages"]) + "\n")
    data = prepare(plain_tokenizer, [file], val_fraction=0.4)
    assert data.prompt_template == DEFAULT_PROMPT_TEMPLATE
    example = data.train[0]
    served = render_prompt(plain_tokenizer, EXPECTED[:1], DEFAULT_PROMPT_TEMPLATE)
    assert example.prompt_ids == served
    trained = [i for i, m in zip(example.rendered.ids, example.rendered.labels_mask, strict=True) if m]
    assert trained[-1] == plain_tokenizer.eos_token_id  # the reply ends where the server stops


def test_a_user_prompt_template_is_used_and_recorded(real_tokenizer, tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
        "{% else %}A: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    file = tmp_path / "chat.jsonl"
    file.write_text(json.dumps(RECORDS["messages"]) + "\n" + json.dumps(RECORDS["messages"]) + "\n")
    data = prepare(real_tokenizer, [file], val_fraction=0.4, prompt_template=template)
    assert data.prompt_template == template
    assert data.train[0].prompt_ids == render_prompt(real_tokenizer, EXPECTED[:1], template)


# -- tool use --------------------------------------------------------------------------------------
def test_the_bundled_tool_data_trains_the_calls_with_the_serving_prompt(real_tokenizer):
    """Tool conversations render with their tools in the prompt, exactly as the server renders them,
    and the loss covers the call (in the base's format) and the final answer, not the tool result."""
    from lorayard.chat_format import ToolContext
    from lorayard.tool_format import HERMES
    from lorayard.train.config import DEMO_DATA_DIR

    data = prepare(real_tokenizer, [DEMO_DATA_DIR / "tools.jsonl"], max_length=512)
    assert data.tool_format == "hermes" and data.formats[str(DEMO_DATA_DIR / "tools.jsonl")] == "messages"
    example = data.train[0]
    tools = ToolContext(example.tools, HERMES)
    served = render_prompt(real_tokenizer, example.messages[:1], tools=tools)
    assert example.rendered.ids[: len(served)] == served
    mask = example.rendered.labels_mask
    trained = real_tokenizer.decode([i for i, m in zip(example.rendered.ids, mask, strict=True) if m])
    city = json.loads(example.messages[1]["tool_calls"][0]["function"]["arguments"])["city"]
    assert trained.startswith('<tool_call>\n{"name": "get_')
    assert f'"arguments": {{"city": "{city}"}}}}\n</tool_call><|im_end|>' in trained
    assert "<tool_response>" not in trained and trained.endswith(
        f"{example.messages[3]['content']}<|im_end|>"
    )


def test_sharegpt_function_call_and_observation_turns(tmp_path, real_tokenizer):
    tools = json.dumps(
        [{"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}]
    )
    row = {
        "tools": tools,
        "conversations": [
            {"from": "human", "value": "add 2"},
            {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2}})},
            {"from": "observation", "value": "4"},
            {"from": "gpt", "value": "It is 4."},
        ],
    }
    data = prepare(real_tokenizer, [write(tmp_path / "fc.jsonl", [row, row])])
    (example,) = data.train
    assert example.messages[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 2}'}
    assert example.messages[2]["role"] == "tool" and data.tool_format == "hermes"
    text = real_tokenizer.decode(example.rendered.ids)
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>' in text
    assert '{"type": "function", "function": {"name": "add"' in text  # the schema in the system turn


def test_bad_tool_records_are_reported(tmp_path, real_tokenizer):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"function": {}}]},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}],
                },
            ]
        },
        {
            "tools": "nope",
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        },
    ]
    with pytest.raises(DataError) as info:
        prepare(real_tokenizer, [write(tmp_path / "bad.jsonl", rows)])
    problems = [str(i) for i in info.value.issues]
    assert "bad.jsonl:1" in problems[0] and "function.name" in problems[0]
    assert "bad.jsonl:2" in problems[1] and "not valid JSON" in problems[1]
    assert "bad.jsonl:3" in problems[2] and "tools" in problems[2]


def test_tool_call_format_is_the_servers_flag_for_training(real_tokenizer, tool_family_base):
    """``tool_call_format`` writes the calls of a template without tools support in that format (and
    the manifest records it); a template that writes its own calls in another format is refused."""
    from transformers import AutoTokenizer

    from lorayard.train.config import DEMO_DATA_DIR

    data = prepare(
        real_tokenizer, [DEMO_DATA_DIR / "tools.jsonl"], max_length=512, tool_call_format="llama3_json"
    )
    assert data.tool_format == "llama3_json"
    example = data.train[0]
    trained = real_tokenizer.decode(
        [i for i, m in zip(example.rendered.ids, example.rendered.labels_mask, strict=True) if m]
    )
    assert trained.startswith('{"name": "get_') and '"parameters": {"city": ' in trained
    qwen = AutoTokenizer.from_pretrained(tool_family_base("qwen"))  # its template writes <tool_call>
    with pytest.raises(DataError, match="'hermes' format, which --tool-call-format llama3_json contradicts"):
        prepare(qwen, [DEMO_DATA_DIR / "tools.jsonl"], max_length=512, tool_call_format="llama3_json")
