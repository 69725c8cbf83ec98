"""Token-level surface: logit_bias, /tokenize and /detokenize (vLLM's bodies), ids checked at the API."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lorayard.chat_format import encode_text, render_prompt

BASE = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _chat(server, **extra) -> dict:
    body = {"model": BASE, "messages": MESSAGES, "temperature": 0, "max_tokens": 6, **extra}
    response = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_logit_bias_steers_and_stays_in_its_row(real_server, real_tokenizer):
    plain = _chat(real_server, logprobs=True)
    first = plain["choices"][0]["logprobs"]["content"][0]["token"]
    first_id = encode_text(real_tokenizer, first)[0]
    banana = encode_text(real_tokenizer, " banana")[0]
    cases = [{}, {"logit_bias": {str(banana): 100}}, {"logit_bias": {str(first_id): -100}}, {}]
    with ThreadPoolExecutor(len(cases)) as pool:
        texts = [
            r["choices"][0]["message"]["content"] for r in pool.map(lambda e: _chat(real_server, **e), cases)
        ]
    assert texts[0] == texts[3] == plain["choices"][0]["message"]["content"], "unbiased rows unchanged"
    assert texts[1] == " banana" * 6 or texts[1].split() == ["banana"] * 6
    assert not texts[2].startswith(first)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"1000000000": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"stop_token_ids": [1000000000], "min_tokens": 2}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_out_of_vocabulary_ids_are_400_naming_the_field(real_server, extra, param):
    body = {"model": BASE, "messages": MESSAGES, "max_tokens": 4, **extra}
    response = httpx.post(real_server.v1 + "/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("prompt", [[-1, 5], [5, 10**9], [[1, 2], [3]]])
def test_bad_prompt_ids_are_400(real_server, prompt):
    body = {"model": BASE, "prompt": prompt, "max_tokens": 2}
    response = httpx.post(real_server.v1 + "/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"


def test_tokenize_and_detokenize_round_trip(real_server, real_tokenizer):
    text = "Hello, world! 你好"
    response = httpx.post(
        real_server.base_url + "/tokenize", json={"prompt": text, "return_token_strs": True}, timeout=30
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tokens"] == list(real_tokenizer(text)["input_ids"]) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] > 0 and len(body["token_strs"]) == body["count"]
    back = httpx.post(real_server.base_url + "/detokenize", json={"tokens": body["tokens"]}, timeout=30)
    assert back.status_code == 200 and back.json() == {"prompt": text}


def test_tokenize_messages_counts_what_chat_sends(real_server, real_tokenizer):
    response = httpx.post(real_server.base_url + "/tokenize", json={"messages": MESSAGES}, timeout=30)
    assert response.json()["tokens"] == render_prompt(real_tokenizer, MESSAGES)
    assert _chat(real_server)["usage"]["prompt_tokens"] == response.json()["count"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
    ],
)
def test_tokenizer_routes_refuse_bad_bodies(real_server, path, body, param):
    response = httpx.post(real_server.base_url + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_p", 0.1), ("allowed_token_ids", [1, 2]), ("bad_words", ["x"]), ("suffix", "!"), ("best_of", 3)],
)
def test_fields_we_cannot_honour_are_refused_by_name(real_server, field, value):
    body = {"model": BASE, "prompt": "Hello", "max_tokens": 2, field: value}
    response = httpx.post(real_server.v1 + "/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


REFUSED_ON_CHAT = {
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "suffix": "!",
    "guided_json": {"type": "object"},
    "guided_regex": "a+",
    "guided_choice": ["a", "b"],
    "guided_grammar": 'root ::= "a"',
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "Paris"},
    "min_p": 0.1,
    "typical_p": 0.5,
    "use_beam_search": True,
    "length_penalty": 2.0,
    "allowed_token_ids": [1, 2],
    "bad_words": ["x"],
    "include_stop_str_in_output": True,
    "skip_special_tokens": False,
    "truncate_prompt_tokens": 4,
    "chat_template": "{{ messages }}",
    "continue_final_message": True,
    "echo": True,
    "prompt_logprobs": 1,
}
"""A value each refused field cannot be served with (docs/api.md's "Refused" table)."""


def test_every_refused_field_is_a_400_naming_it(real_server):
    """Each field we cannot honour is refused by name, never ignored: a new refusal needs a case here."""
    from lorayard.server.api.serving import REFUSED_FIELDS

    assert set(REFUSED_ON_CHAT) == set(REFUSED_FIELDS)
    for field, value in REFUSED_ON_CHAT.items():
        body = {"model": BASE, "messages": MESSAGES, "max_tokens": 2, field: value}
        response = httpx.post(real_server.v1 + "/chat/completions", json=body, timeout=60)
        assert response.status_code == 400, (field, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (field, "unsupported_field"), error


def test_no_op_values_of_refused_fields_are_accepted(real_server):
    body = {"model": BASE, "prompt": "Hello", "max_tokens": 2, "min_p": 0.0, "skip_special_tokens": True}
    assert httpx.post(real_server.v1 + "/completions", json=body, timeout=60).status_code == 200
