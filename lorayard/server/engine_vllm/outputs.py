"""vLLM's request outputs -> our :class:`TokenEvent` s, one per token (no vLLM import).

vLLM runs with ``RequestOutputKind.DELTA``: each output carries the tokens since the last one (more
than one when the consumer fell behind and vLLM merged them), their logprobs, and on the first one
the prompt's logprobs. Logprob entries are ``{token_id: Logprob(logprob, rank, ...)}`` holding the
chosen token and the top ``k`` by rank; ours are the chosen token's logprob and the top ``k``
(``-inf`` alternatives left out, as our sampler leaves them out).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from lorayard.server.engine.types import FinishReason, PromptLogprob, TokenEvent, TopLogprob


class _Logprob(Protocol):
    logprob: float
    rank: int | None


LogprobEntry = Mapping[int, _Logprob]


def top_logprobs(entry: LogprobEntry, k: int) -> tuple[TopLogprob, ...]:
    """The ``k`` best alternatives of one position, best first, without ``-inf`` ones."""
    ranked = sorted(
        (lp.rank, token, lp.logprob) for token, lp in entry.items() if lp.rank is not None and lp.rank <= k
    )
    return tuple(TopLogprob(token, logprob) for _, token, logprob in ranked if logprob != float("-inf"))


def prompt_logprobs(
    entries: Sequence[LogprobEntry | None], prompt_ids: Sequence[int], k: int
) -> tuple[PromptLogprob | None, ...]:
    """One entry per prompt token, None first (nothing scores the first token)."""
    out: list[PromptLogprob | None] = [None]
    for position, entry in enumerate(entries[1:], start=1):
        if entry is None:
            out.append(None)
            continue
        out.append(PromptLogprob(entry[prompt_ids[position]].logprob, top_logprobs(entry, k)))
    return tuple(out)


@dataclass
class OutputTracker:
    """One request's running counts, turning its vLLM outputs into events."""

    prompt_ids: Sequence[int]
    logprobs: int | None
    prompt_top: int | None
    scoring: bool
    """max_tokens 0: vLLM generates one token, which is dropped."""
    output_tokens: int = 0
    first: bool = True

    def events(self, output: Any) -> Iterator[TokenEvent]:
        """The events of one ``vllm.RequestOutput``."""
        completion = output.outputs[0]
        ids = [int(t) for t in completion.token_ids]
        token_logprobs = cast("Sequence[LogprobEntry] | None", completion.logprobs)
        cached = output.num_cached_tokens
        finish = _finish_reason(completion.finish_reason) if output.finished else None
        prompt = None
        if self.first and self.prompt_top is not None and output.prompt_logprobs is not None:
            prompt = prompt_logprobs(output.prompt_logprobs, self.prompt_ids, self.prompt_top)
        self.first = False
        if self.scoring:
            if finish is not None or ids:
                yield TokenEvent(
                    None,
                    finish_reason="length" if finish != "abort" else "abort",
                    prompt_tokens=len(self.prompt_ids),
                    output_tokens=0,
                    prompt_logprobs=prompt,
                    cached_tokens=cached,
                )
            return
        if not ids:
            if finish is not None:
                yield TokenEvent(
                    None,
                    finish_reason=finish,
                    prompt_tokens=len(self.prompt_ids),
                    output_tokens=self.output_tokens,
                    prompt_logprobs=prompt,
                    cached_tokens=cached,
                )
            return
        for i, token in enumerate(ids):
            self.output_tokens += 1
            logprob: float | None = None
            tops: tuple[TopLogprob, ...] = ()
            if self.logprobs is not None and token_logprobs is not None:
                entry = token_logprobs[i]
                logprob, tops = entry[token].logprob, top_logprobs(entry, self.logprobs)
            yield TokenEvent(
                token,
                logprob=logprob,
                top_logprobs=tops,
                finish_reason=finish if i == len(ids) - 1 else None,
                prompt_tokens=len(self.prompt_ids),
                output_tokens=self.output_tokens,
                prompt_logprobs=prompt if i == 0 else None,
                cached_tokens=cached,
            )


def _finish_reason(reason: str | None) -> FinishReason:
    """vLLM's finish reasons: stop (a stop token; EOS is one of ours), length, abort; anything else
    (an error, a repetition limit we never set) finishes the row as aborted."""
    if reason in ("stop", "length"):
        return cast("FinishReason", reason)
    return "abort"
