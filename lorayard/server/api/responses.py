"""Deltas -> typed OpenAI responses and stream chunks (models in :mod:`server.api.protocol`).

One builder per shape, used by both the whole response and the stream: logprob lists, tool calls.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lorayard.server.api.generation import ChoiceDelta, TokenLogprob
from lorayard.server.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FunctionCall,
    FunctionCallDelta,
    PromptTokensDetails,
    ToolCall,
    ToolCallDelta,
    TopLogprobEntry,
    Usage,
    VllmLogprob,
)
from lorayard.server.api.streaming import IncrementalDetokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lorayard.server.api.generation import UsageCount
    from lorayard.server.api.serving import EngineJob, ToolCalling
    from lorayard.server.engine.types import PromptLogprob


def usage_of(count: UsageCount) -> Usage:
    return Usage(
        prompt_tokens=count.prompt_tokens,
        completion_tokens=count.completion_tokens,
        total_tokens=count.prompt_tokens + count.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=count.cached_tokens),
    )


class TokenTexts:
    """Token ids -> the text each one stands for (" Paris", not the vocabulary's "ĠParis")."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        token = str(self.tokenizer.convert_ids_to_tokens(token_id))  # one id in: one token string out
        return str(self.tokenizer.convert_tokens_to_string([token]))

    def offsets(self, ids: list[int]) -> list[int]:
        """Where each token's text starts in the decoded ``ids`` (specials kept, as echo shows them)."""
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=False)
        offsets, produced = [], 0
        for token_id in ids:
            offsets.append(produced)
            produced += len(detok.add(token_id))
        return offsets


# -- completions ---------------------------------------------------------------------------------
def _prompt_part(
    texts: TokenTexts, prompt_ids: list[int], entries: tuple[PromptLogprob | None, ...]
) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=[texts(t) for t in prompt_ids],
        token_logprobs=[None if e is None else e.logprob for e in entries],
        top_logprobs=[
            None if e is None else {texts(t.token_id): t.logprob for t in e.top_logprobs} for e in entries
        ],
        text_offset=texts.offsets(prompt_ids),
    )


def _generated_part(texts: TokenTexts, entries: list[TokenLogprob], start: int) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=[texts(e.token_id) for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{texts(t.token_id): t.logprob for t in e.top} for e in entries],
        text_offset=[start + e.text_offset for e in entries],
    )


def _joined(*parts: CompletionLogprobs) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for part in parts:
        out.tokens += part.tokens
        out.token_logprobs += part.token_logprobs
        out.top_logprobs += part.top_logprobs
        out.text_offset += part.text_offset
    return out


def _vllm_prompt_logprobs(
    texts: TokenTexts, prompt_ids: list[int], entries: tuple[PromptLogprob | None, ...]
) -> list[dict[str, VllmLogprob] | None]:
    """vLLM's shape: per prompt token, {token id: logprob, rank, decoded_token} for it and the top k.
    The prompt token's own rank is only known when it is among the top k (else null)."""
    out: list[dict[str, VllmLogprob] | None] = []
    for token_id, entry in zip(prompt_ids, entries, strict=True):
        if entry is None:
            out.append(None)
            continue
        ranked = {t.token_id: (rank, t.logprob) for rank, t in enumerate(entry.top_logprobs, start=1)}
        by_id = {
            str(token_id): VllmLogprob(
                logprob=entry.logprob, rank=ranked.get(token_id, (None,))[0], decoded_token=texts(token_id)
            )
        }
        for tid, (rank, logprob) in ranked.items():
            by_id.setdefault(str(tid), VllmLogprob(logprob=logprob, rank=rank, decoded_token=texts(tid)))
        out.append(by_id)
    return out


@dataclass
class _CompletionChoiceState:
    """What one choice of a completion has sent so far (the stream builds chunks from it)."""

    text: str = ""
    started: bool = False
    logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)


class CompletionBuilder:
    """Completion deltas -> CompletionChoice parts (whole or per chunk); echo goes first."""

    def __init__(self, job: EngineJob, tokenizer: PreTrainedTokenizerBase) -> None:
        self.job = job
        self.texts = TokenTexts(tokenizer)
        self.echo = job.echo or ""

    def part(self, delta: ChoiceDelta, first: bool) -> CompletionChoice:
        """The choice fragment this delta adds (a choice's first one carries the echo)."""
        job = self.job
        text = delta.text
        parts = []
        prompt_logprobs = None
        if first and job.echo is not None:
            text = self.echo + text
            if job.logprobs and delta.prompt_logprobs is not None:
                parts.append(_prompt_part(self.texts, job.prompt_ids, delta.prompt_logprobs))
        if job.vllm_prompt_logprobs and delta.prompt_logprobs is not None:
            prompt_logprobs = _vllm_prompt_logprobs(self.texts, job.prompt_ids, delta.prompt_logprobs)
        parts.append(_generated_part(self.texts, delta.logprobs, len(self.echo)))
        return CompletionChoice(
            index=delta.index,
            text=text,
            logprobs=_joined(*parts) if job.logprobs else None,
            finish_reason=delta.finish_reason,
            prompt_logprobs=prompt_logprobs,
        )

    def response(self, deltas: list[ChoiceDelta], usage: UsageCount) -> Completion:
        choices = [CompletionChoice(index=i, text="") for i in range(self.job.n)]
        seen: set[int] = set()
        for delta in deltas:
            part = self.part(delta, delta.index not in seen)
            seen.add(delta.index)
            choice = choices[delta.index]
            choice.text += part.text
            if part.logprobs is not None:
                choice.logprobs = _joined(choice.logprobs or CompletionLogprobs(), part.logprobs)
            choice.finish_reason = part.finish_reason or choice.finish_reason
            choice.prompt_logprobs = part.prompt_logprobs or choice.prompt_logprobs
        return Completion(
            id=_id("cmpl-"),
            created=int(time.time()),
            model=self.job.model,
            choices=choices,
            usage=usage_of(usage),
        )

    async def chunks(
        self, deltas: AsyncIterator[ChoiceDelta], usage: UsageCount
    ) -> AsyncIterator[Completion]:
        response_id, created = _id("cmpl-"), int(time.time())
        seen: set[int] = set()
        async for delta in deltas:
            part = self.part(delta, delta.index not in seen)
            seen.add(delta.index)
            yield Completion(id=response_id, created=created, model=self.job.model, choices=[part])
        if self.job.include_usage:
            yield Completion(
                id=response_id, created=created, model=self.job.model, choices=[], usage=usage_of(usage)
            )


# -- chat ----------------------------------------------------------------------------------------
def _chat_logprobs(texts: TokenTexts, entries: list[TokenLogprob]) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprobEntry:
        text = texts(token_id)
        return TopLogprobEntry(token=text, logprob=logprob, bytes=list(text.encode()))

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **entry(e.token_id, e.logprob).model_dump(),
                top_logprobs=[entry(t.token_id, t.logprob) for t in e.top],
            )
            for e in entries
        ]
    )


def _tool_call(calling: ToolCalling, text: str) -> ToolCall | None:
    """The call the constrained output spells, or None if it is not complete JSON (cut by length)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if calling.named is not None:
        name, arguments = calling.named, value
    elif isinstance(value, dict) and value.get("name") in calling.names and "arguments" in value:
        name, arguments = value["name"], value["arguments"]
    else:
        return None
    return ToolCall(id=_id("call_"), function=FunctionCall(name=name, arguments=json.dumps(arguments)))


class ChatBuilder:
    """Chat deltas -> ChatCompletion or chunks; forced tool calls become ``tool_calls``."""

    def __init__(self, job: EngineJob, tokenizer: PreTrainedTokenizerBase) -> None:
        self.job = job
        self.texts = TokenTexts(tokenizer)

    def _logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        return _chat_logprobs(self.texts, entries) if self.job.logprobs else None

    def response(self, deltas: list[ChoiceDelta], usage: UsageCount) -> ChatCompletion:
        n = self.job.n
        texts, reasons = [""] * n, ["stop"] * n
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        for delta in deltas:
            texts[delta.index] += delta.text
            logprobs[delta.index] += delta.logprobs
            reasons[delta.index] = delta.finish_reason or reasons[delta.index]
        choices = []
        for i in range(n):
            message = AssistantMessage(content=texts[i])
            call = None if self.job.tools is None else _tool_call(self.job.tools, texts[i])
            if call is not None:
                message, reasons[i] = AssistantMessage(content=None, tool_calls=[call]), "tool_calls"
            choices.append(
                ChatChoice(
                    index=i, message=message, logprobs=self._logprobs(logprobs[i]), finish_reason=reasons[i]
                )
            )
        return ChatCompletion(
            id=_id("chatcmpl-"),
            created=int(time.time()),
            model=self.job.model,
            choices=choices,
            usage=usage_of(usage),
        )

    async def chunks(
        self, deltas: AsyncIterator[ChoiceDelta], usage: UsageCount
    ) -> AsyncIterator[ChatCompletionChunk]:
        """Text streams as content deltas. A call to a named function streams its arguments as they
        come; a call chosen among several tools is sent whole once its JSON is complete."""
        response_id, created, model = _id("chatcmpl-"), int(time.time()), self.job.model

        def chunk(choices: list[ChatChunkChoice], **extra: object) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices, **extra)

        yield chunk(
            [
                ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                for i in range(self.job.n)
            ]
        )
        calling = self.job.tools
        texts = [""] * self.job.n
        call_ids = [_id("call_") for _ in range(self.job.n)]
        async for delta in deltas:
            i = delta.index
            first_text = not texts[i]
            texts[i] += delta.text
            finish = delta.finish_reason
            if calling is None:
                out = ChatDelta(content=delta.text) if delta.text else ChatDelta()
            else:
                call = _tool_call(calling, texts[i]) if finish is not None else None
                if finish is not None and call is not None:
                    finish = "tool_calls"
                out = ChatDelta()
                if calling.named is not None and (delta.text or (call and first_text)):
                    header = first_text
                    out = ChatDelta(
                        tool_calls=[
                            ToolCallDelta(
                                index=0,
                                id=call_ids[i] if header else None,
                                type="function" if header else None,
                                function=FunctionCallDelta(
                                    name=calling.named if header else None, arguments=delta.text
                                ),
                            )
                        ]
                    )
                elif calling.named is None and call is not None:
                    out = ChatDelta(
                        tool_calls=[
                            ToolCallDelta(
                                index=0,
                                id=call_ids[i],
                                type="function",
                                function=FunctionCallDelta(
                                    name=call.function.name, arguments=call.function.arguments
                                ),
                            )
                        ]
                    )
                elif finish is not None and call is None and calling.named is None and texts[i]:
                    out = ChatDelta(content=texts[i])  # cut short: not a call, show what came
            yield chunk(
                [
                    ChatChunkChoice(
                        index=i, delta=out, logprobs=self._logprobs(delta.logprobs), finish_reason=finish
                    )
                ]
            )
        if self.job.include_usage:
            yield chunk([], usage=usage_of(usage))


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex
