"""Deltas -> typed OpenAI responses and stream chunks (models in :mod:`lorayard.server.api.protocol`).

One builder per shape, used by both the whole response and the stream: logprob lists, tool calls.
"""

from __future__ import annotations

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
from lorayard.server.api.tool_calls import CallStarted, ContentDelta, ToolCallParser, ToolEvent

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lorayard.server.api.generation import UsageCount
    from lorayard.server.api.serving import EngineJob
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


@dataclass
class _ChatChoice:
    """One chat choice's deltas -> OpenAI chat deltas; with tools, through the tool-call parser, so
    the whole answer is exactly the sum of the streamed one."""

    parser: ToolCallParser | None
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "stop"

    def add(self, delta: ChoiceDelta) -> tuple[ChatDelta, str | None]:
        """The chat delta this engine delta makes, and the choice's finish reason if it ends here."""
        self.logprobs += delta.logprobs
        finish = delta.finish_reason
        if self.parser is None:
            self.content += delta.text
            out = ChatDelta(content=delta.text) if delta.text else ChatDelta()
        else:
            events = self.parser.push(delta.text)
            if finish is not None:
                events += self.parser.finish()
            out = self._chat_delta(events)
            if finish == "stop" and self.parser.calls:
                finish = "tool_calls"  # a call cut by max_tokens keeps "length"
        if finish is not None:
            self.finish_reason = finish
        return out, finish

    def _chat_delta(self, events: list[ToolEvent]) -> ChatDelta:
        content = ""
        calls: list[ToolCallDelta] = []
        for event in events:
            if isinstance(event, ContentDelta):
                content += event.text
            elif isinstance(event, CallStarted):
                self.calls.append(ToolCall(id=event.id, function=FunctionCall(name=event.name, arguments="")))
                function = FunctionCallDelta(name=event.name, arguments="")
                calls.append(
                    ToolCallDelta(index=event.index, id=event.id, type="function", function=function)
                )
            else:
                self.calls[event.index].function.arguments += event.text
                calls.append(
                    ToolCallDelta(index=event.index, function=FunctionCallDelta(arguments=event.text))
                )
        self.content += content
        return ChatDelta(content=content or None, tool_calls=calls or None)

    def message(self) -> AssistantMessage:
        """The whole answer: ``content`` null when the turn is calls alone, no ``tool_calls`` without."""
        content = None if self.calls and not self.content else self.content
        return AssistantMessage(content=content, tool_calls=self.calls or None)


class ChatBuilder:
    """Chat deltas -> ChatCompletion or chunks; with tools, calls become ``tool_calls``."""

    def __init__(self, job: EngineJob, tokenizer: PreTrainedTokenizerBase) -> None:
        self.job = job
        self.texts = TokenTexts(tokenizer)

    def _logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        return _chat_logprobs(self.texts, entries) if self.job.logprobs else None

    def _choices(self) -> list[_ChatChoice]:
        tools = self.job.tools
        return [
            _ChatChoice(None if tools is None else ToolCallParser(tools.format, tools.callable))
            for _ in range(self.job.n)
        ]

    def response(self, deltas: list[ChoiceDelta], usage: UsageCount) -> ChatCompletion:
        states = self._choices()
        for delta in deltas:
            states[delta.index].add(delta)
        choices = [
            ChatChoice(
                index=i,
                message=state.message(),
                logprobs=self._logprobs(state.logprobs),
                finish_reason=state.finish_reason,
            )
            for i, state in enumerate(states)
        ]
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
        """Content deltas until a call starts, then the call's header and its arguments as they come."""
        response_id, created, model = _id("chatcmpl-"), int(time.time()), self.job.model

        def chunk(choices: list[ChatChunkChoice], **extra: object) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices, **extra)

        yield chunk(
            [
                ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                for i in range(self.job.n)
            ]
        )
        states = self._choices()
        async for delta in deltas:
            out, finish = states[delta.index].add(delta)
            choice = ChatChunkChoice(
                index=delta.index, delta=out, logprobs=self._logprobs(delta.logprobs), finish_reason=finish
            )
            yield chunk([choice])
        if self.job.include_usage:
            yield chunk([], usage=usage_of(usage))


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex
