"""The seed projects' own base, end to end: a tiny GPT-2 (no chat template, as gpt2 comes) gets a
``c_attn`` adapter trained by the real job on seed-style data (a JSON list of text/target rows), and a
real server serves it beside a PEFT adapter on the other linears (both c_proj, c_fc) and the bare base:
greedy completions in one batch equal PEFT's, echo logprobs equal the HF / PEFT forward, and a
repeated prompt is answered from the prefix cache with the same text."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorayard.base_model import resolve_base_model
from lorayard.chat_format import encode_text
from lorayard.testing.random_adapter import build_random_adapter
from lorayard.testing.random_base import without_chat_template
from lorayard.volume import AdapterVolume, read_manifest

from .conftest import openai_on, publish_folder, train_and_publish

PROMPTS = ["Question 3:", "The capital of France is", "Once upon a time"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def gpt2_base(tiny_arch_base, tmp_path_factory):
    """The tiny random GPT-2 with its chat template removed, as gpt2 and distilgpt2 come."""
    folder = without_chat_template(tiny_arch_base("gpt2"), tmp_path_factory.mktemp("seed-gpt2") / "base")
    assert AutoTokenizer.from_pretrained(folder).chat_template is None
    return folder


@pytest.fixture(scope="module")
def volume(gpt2_base, tmp_path_factory):
    """seed: c_attn, trained and published by the job; mlp: a random PEFT adapter on c_proj and c_fc."""
    root = tmp_path_factory.mktemp("seed-volume")
    data = root / "seed.json"  # the seed projects' format: one JSON list of text/target rows
    data.write_text(json.dumps([{"text": f"Question {i}:", "target": f" answer {i}."} for i in range(12)]))
    train_and_publish(gpt2_base, root / "adapters", data, "seed", "--target-modules", "c_attn")
    base = resolve_base_model(str(gpt2_base))
    build_random_adapter(
        gpt2_base, root / "mlp-src", 7, b_scale=4.0, r=4, lora_alpha=8, target_modules=["c_proj", "c_fc"]
    )
    publish_folder(AdapterVolume(root / "adapters"), "mlp", root / "mlp-src", base.fingerprint, base.model_id)
    return root / "adapters"


@pytest.fixture(scope="module")
def client(gpt2_base, volume, tmp_path_factory):
    with openai_on(gpt2_base, volume, tmp_path_factory.mktemp("logs") / "seed-gpt2.log") as client:
        yield client


def _model(base, adapter):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


def _peft_text(base, adapter, prompt: str) -> str:
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = encode_text(tokenizer, prompt)
    with torch.no_grad():
        out = _model(base, adapter).generate(
            torch.tensor([ids]),
            max_new_tokens=MAX_TOKENS,
            min_new_tokens=MAX_TOKENS,  # the server is asked for exactly MAX_TOKENS (ignore_eos)
            do_sample=False,
            pad_token_id=0,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_the_job_trained_c_attn_only(volume):
    folder = AdapterVolume(volume).resolve("seed").path
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == ["c_attn"]
    assert read_manifest(folder).prompt_template is None


def test_base_and_both_adapters_in_one_batch_match_peft(client, gpt2_base, volume):
    resolve = AdapterVolume(volume).resolve
    base_id = resolve_base_model(str(gpt2_base)).model_id
    cases = [(model, prompt) for model in ("seed", "mlp", None) for prompt in PROMPTS]

    def ask(case: tuple[str | None, str]) -> str:
        model, prompt = case
        answer = client.completions.create(
            model=model or base_id,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert answer.usage.completion_tokens == MAX_TOKENS
        return answer.choices[0].text

    with ThreadPoolExecutor(len(cases)) as pool:
        texts = list(pool.map(ask, cases))
    for (model, prompt), text in zip(cases, texts, strict=True):
        assert text == _peft_text(gpt2_base, model and resolve(model).path, prompt), (model, prompt)
    by_case = dict(zip(cases, texts, strict=True))
    assert by_case[("mlp", PROMPTS[1])] != by_case[(None, PROMPTS[1])], "the adapter must change the output"


@pytest.mark.parametrize("model", ["seed", "mlp"])
def test_echo_logprobs_equal_the_peft_forward(client, gpt2_base, volume, model):
    prompt = "Question 5: answer 5. Question 6:"
    answer = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    ids = encode_text(AutoTokenizer.from_pretrained(gpt2_base), prompt)
    with torch.no_grad():
        logits = _model(gpt2_base, AdapterVolume(volume).resolve(model).path)(torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(ids) - 1), ids[1:]]
    got = answer.choices[0].logprobs.token_logprobs
    assert got[0] is None and len(got) == len(ids)
    assert got[1:] == pytest.approx(expected.tolist(), abs=1e-4)


def test_a_repeated_prompt_is_served_from_the_prefix_cache(client, gpt2_base, volume):
    prompt = " ".join(f"Question {i}: answer {i}." for i in range(8))
    first, again = (
        client.completions.create(model="seed", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        for _ in range(2)
    )
    details = again.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens >= 16
    assert again.choices[0].text == first.choices[0].text
