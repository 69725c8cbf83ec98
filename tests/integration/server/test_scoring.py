"""Scoring a prompt over HTTP (echo + logprobs, vLLM's prompt_logprobs), as evaluation tools do.

The values must be the model's own log-softmax (with the adapter applied), and lm-evaluation-harness
through the server must score a multiple-choice task exactly as it scores the same weights in process.
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorayard.chat_format import encode_text

BASE = "smollm2-135m-instruct"
PROMPT = "The capital of France is Paris, and the capital of Germany is"
TASK_DIR = Path(__file__).with_name("lm_eval_task")
TOLERANCE = 2e-3


def _reference_logprobs(base_path: Path, adapter_dir: Path | None, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of the next-token logits at every position, in process."""
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


# Pinned: another test publishes qv8 v2 on the shared volume.
@pytest.mark.parametrize("adapter", [None, "qv8@v1"])
def test_echo_logprobs_are_the_models_log_softmax(
    real_server, real_base, real_tokenizer, real_adapter_sources, adapter
):
    ids = encode_text(real_tokenizer, PROMPT)
    body = {"model": adapter or BASE, "prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 0}
    response = httpx.post(real_server.v1 + "/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    assert "".join(logprobs["tokens"]) == PROMPT
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(ids))]
    reference = _reference_logprobs(
        real_base.path, None if adapter is None else real_adapter_sources / adapter.partition("@")[0], ids
    )
    expected = [reference[i - 1, ids[i]].item() for i in range(1, len(ids))]
    got = logprobs["token_logprobs"][1:]
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < TOLERANCE
    for i in range(1, len(ids)):
        top = logprobs["top_logprobs"][i]
        assert len(top) <= 2 and math.isclose(
            max(top.values()), reference[i - 1].max().item(), abs_tol=TOLERANCE
        )


def test_echo_then_generated_tokens_line_up(real_server, real_tokenizer):
    """echo + logprobs + max_tokens > 0: prompt entries, then the generated ones, offsets into the text."""
    ids = encode_text(real_tokenizer, PROMPT)
    body = {"model": BASE, "prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0}
    choice = httpx.post(real_server.v1 + "/completions", json=body, timeout=60).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 3
    assert choice["text"].startswith(PROMPT)
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"], strict=True):
        assert choice["text"][offset:].startswith(token)
    # Greedy: each generated token is its step's most likely one.
    for logprob, top in zip(
        logprobs["token_logprobs"][len(ids) :], logprobs["top_logprobs"][len(ids) :], strict=True
    ):
        assert math.isclose(logprob, max(top.values()), abs_tol=1e-5)


def test_vllm_prompt_logprobs_field(real_server, real_tokenizer):
    ids = encode_text(real_tokenizer, PROMPT)
    body = {"model": BASE, "prompt": ids, "prompt_logprobs": 1, "max_tokens": 1, "temperature": 0}
    response = httpx.post(real_server.v1 + "/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token_id, entry in zip(ids[1:], entries[1:], strict=True):
        assert str(token_id) in entry and entry[str(token_id)]["logprob"] <= 0
        assert any(e["rank"] == 1 for e in entry.values())
    assert choice["logprobs"] is None  # only asked for the prompt's


def test_max_tokens_zero_needs_echo(real_server):
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 0}
    response = httpx.post(real_server.v1 + "/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def _accuracy(results: dict) -> float:
    return results["results"]["lorayard_facts"]["acc,none"]


def test_lm_eval_local_completions_scores_as_in_process(real_server, real_base, monkeypatch, tmp_path):
    """lm-eval's `local-completions` over HTTP == lm-eval's `hf` on the same weights, exactly.

    ~50 s on 2 shared cores (80 scored options each way, plus lm-eval's own start-up): the one test
    that proves the standard evaluation tool scores a served model right."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.chdir(TASK_DIR.parents[3])  # the task's data_files path is relative to the repo
    tasks = TaskManager(include_path=str(TASK_DIR))
    served = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(
            f"model={BASE},base_url={real_server.v1}/completions,tokenizer_backend=huggingface,"
            f"tokenizer={real_base.path},num_concurrent=1,max_retries=1,tokenized_requests=True"
        ),
        tasks=["lorayard_facts"],
        task_manager=tasks,
    )
    in_process = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={real_base.path},dtype=float32,device=cpu",
        tasks=["lorayard_facts"],
        task_manager=tasks,
        batch_size=1,
    )
    assert _accuracy(served) == _accuracy(in_process)
    assert _accuracy(served) > 0.5, "the real model knows most of these; chance is 0.25"


def test_a_generated_end_of_sequence_keeps_its_logprob_entry(real_server, real_tokenizer):
    """echo + logprobs + max_tokens 1 where the one generated token is EOS (forced by logit_bias):
    the EOS entry is listed after the prompt's, as vLLM answers, so lm-evaluation-harness's
    token_logprobs[ctxlen:-1] keeps the prompt's last token (issue 23, item 5)."""
    ids = encode_text(real_tokenizer, PROMPT)
    eos = real_tokenizer.convert_tokens_to_ids("<|im_end|>")
    body = {
        **{"model": BASE, "prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 1},
        **{"temperature": 0, "logit_bias": {str(eos): 100}},
    }
    response = httpx.post(real_server.v1 + "/completions", json=body, timeout=60).json()
    choice = response["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == PROMPT  # EOS adds no text
    assert response["usage"]["completion_tokens"] == 1
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 1 == len(logprobs["token_logprobs"])
    assert logprobs["tokens"][-1] == "<|im_end|>"
    assert logprobs["token_logprobs"][-1] > -1e-3  # biased by +100: all but certain
    assert logprobs["text_offset"][-1] == len(PROMPT)
    assert "".join(logprobs["tokens"][:-1]) == PROMPT
