"""A base without a chat template, trained by the real job and served by a real server: text/target
rows train as raw prompt + completion + EOS and /v1/completions matches PEFT; chat rows train with the
default prompt template, the manifest records it, and chat requests for that adapter match PEFT on
the same ids."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorayard.chat_format import DEFAULT_PROMPT_TEMPLATE, encode_text, render_prompt, stop_token_ids
from lorayard.testing.random_base import without_chat_template
from lorayard.train.__main__ import main as train_main
from lorayard.volume import AdapterVolume, read_manifest

from .conftest import openai_on, train_and_publish


@pytest.fixture(scope="module")
def plain_base(tiny_base_dir, tmp_path_factory):
    """The tiny Llama with its chat template removed, as raw base checkpoints come."""
    folder = without_chat_template(tiny_base_dir, tmp_path_factory.mktemp("template-free") / "base")
    assert AutoTokenizer.from_pretrained(folder).chat_template is None
    return folder


@pytest.fixture(scope="module")
def trained(plain_base, tmp_path_factory):
    """Two adapters trained by the job on the template-free base: raw text/target and chat rows."""
    root = tmp_path_factory.mktemp("template-free-volume")
    rows = {
        "raw": [{"text": f"Question {i}:", "target": f" answer {i}."} for i in range(10)],
        "chat": [
            {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
            for i in range(10)
        ],
    }
    for name, data in rows.items():
        file = root / f"{name}.jsonl"
        file.write_text("".join(json.dumps(r) + "\n" for r in data))
        train_and_publish(plain_base, root / "adapters", file, name, "--target-modules", "all-linear")
    return root / "adapters"


@pytest.fixture(scope="module")
def client(plain_base, trained, tmp_path_factory):
    with openai_on(plain_base, trained, tmp_path_factory.mktemp("logs") / "template-free.log") as client:
        yield client


def _peft_text(base, adapter, ids: list[int], max_new_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stop_token_ids(tokenizer)),
            pad_token_id=0,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_manifests_record_the_prompt_template(trained):
    volume = AdapterVolume(trained)
    assert read_manifest(volume.resolve("raw").path).prompt_template is None
    assert read_manifest(volume.resolve("chat").path).prompt_template == DEFAULT_PROMPT_TEMPLATE


def test_completions_on_a_raw_adapter_match_peft(client, plain_base, trained):
    prompt = "Question 3:"
    answer = client.completions.create(model="raw", prompt=prompt, max_tokens=8, temperature=0)
    ids = encode_text(AutoTokenizer.from_pretrained(plain_base), prompt)
    folder = AdapterVolume(trained).resolve("raw").path
    assert answer.usage.completion_tokens > 0
    assert answer.choices[0].text == _peft_text(plain_base, folder, ids, 8)


def test_chat_on_a_templated_adapter_matches_peft(client, plain_base, trained):
    messages = [{"role": "user", "content": "Q3?"}]
    answer = client.chat.completions.create(model="chat", messages=messages, max_tokens=8, temperature=0)
    ids = render_prompt(AutoTokenizer.from_pretrained(plain_base), messages, DEFAULT_PROMPT_TEMPLATE)
    assert answer.usage.prompt_tokens == len(ids)
    folder = AdapterVolume(trained).resolve("chat").path
    assert answer.choices[0].message.content == _peft_text(plain_base, folder, ids, 8)


def test_chat_without_any_template_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(
            model="raw", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )


@pytest.mark.parametrize(("name", "chat"), [("raw", False), ("chat", True)])
def test_the_generate_command_renders_as_the_server_does(plain_base, trained, capsys, name, chat):
    tokenizer = AutoTokenizer.from_pretrained(plain_base)
    if chat:
        ids = render_prompt(tokenizer, [{"role": "user", "content": "Q3?"}], DEFAULT_PROMPT_TEMPLATE)
    else:
        ids = encode_text(tokenizer, "Q3?")
    capsys.readouterr()
    args = ["generate", "--adapter", name, "--adapters-dir", str(trained), "--prompt", "Q3?"]
    assert train_main([*args, "--max-new-tokens", "8"]) == 0
    folder = AdapterVolume(trained).resolve(name).path
    assert capsys.readouterr().out.strip() == _peft_text(plain_base, folder, ids, 8).strip()


def test_default_max_tokens_follows_the_adapters_own_template(client):
    """The prompt of a templated adapter is rendered once its version is leased; the default max_tokens
    (fill the window) is computed from that prompt, not from an empty one, so a long chat is served."""
    window = httpx.post(
        str(client.base_url).removesuffix("/v1/") + "/tokenize", json={"prompt": "x"}, timeout=30
    ).json()["max_model_len"]
    messages = [{"role": "user", "content": "hi " * (window - 40)}]
    answer = client.chat.completions.create(model="chat", messages=messages, temperature=0)
    assert answer.usage.prompt_tokens > window - 40
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens <= window
