"""Our :class:`SamplingParams` -> the keyword arguments of vLLM's, field by field (no vLLM import).

Every field maps to vLLM's own of the same meaning, or the request is refused by name; nothing is
approximated:

- end-of-turn: ours are the chat format's end-of-turn ids (``lorayard.chat_format.stop_token_ids``),
  vLLM's its tokenizer's EOS. vLLM's own EOS check is switched off (``ignore_eos``) and ours are
  passed as stop token ids, so a row stops on exactly the tokens it stops on in our engine; our
  ``ignore_eos`` drops them, the request's own ``stop_token_ids`` still stop it (our semantics).
  ``min_tokens`` masks all of them until reached, in vLLM as in ours.
- stop strings are not passed: the API layer cuts them from the text (both engines alike).
- ``max_tokens`` 0 (scoring a prompt): vLLM needs at least one token; it generates one, which
  :mod:`lorayard.server.engine_vllm.outputs` drops, finishing "length" with no token as ours does.
- structured output: the grammar our compiler builds, as EBNF (``guided.grammar_text``).
- logprobs are the processed ones (the engine runs with ``logprobs_mode="processed_logprobs"``):
  after penalties, bias, masks and temperature, as our sampler reports them.
"""

from __future__ import annotations

from typing import Any

from lorayard.server.engine.guided import grammar_text
from lorayard.server.engine.types import InvalidRequest, SamplingParams

MAX_LOGPROBS = 20
"""vLLM's ``max_logprobs``: the most top alternatives per token (OpenAI's top_logprobs bound)."""


def sampling_kwargs(params: SamplingParams, eos_token_ids: frozenset[int]) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for ``params`` (``structured_outputs`` as the
    keyword arguments of ``vllm.sampling_params.StructuredOutputsParams``). Raises InvalidRequest
    naming the field vLLM cannot honour exactly."""
    for name, count in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
        if count is not None and count > MAX_LOGPROBS:
            raise InvalidRequest(
                f"{name}: at most {MAX_LOGPROBS} alternatives per token with --engine vllm, got {count}", name
            )
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    kwargs: dict[str, Any] = {
        "n": 1,  # the API layer submits each choice as its own request, with its own seed
        "max_tokens": max(params.max_tokens, 1),
        "min_tokens": params.min_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "seed": params.seed,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        "ignore_eos": True,
        "stop_token_ids": sorted(stops),
        "logprobs": params.logprobs,
        "prompt_logprobs": params.prompt_logprobs,
        "logit_bias": dict(params.logit_bias) or None,
        "detokenize": False,  # the API layer detokenizes (stop strings, UTF-8 boundaries)
    }
    if params.guided is not None:
        kwargs["structured_outputs"] = {"grammar": grammar_text(params.guided)}
    return kwargs
