"""Chat's stream chunks -> the Responses API's output items, stream events and final response object.

Both a streamed and a whole /v1/responses answer are assembled here from the chunks
:class:`lorayard.server.api.responses.ChatBuilder` makes, so the two cannot differ, and a tool call chat
recognises is a ``function_call`` item without a second parser. Events follow OpenAI's order:
``response.created``, ``response.in_progress``, then per output item ``output_item.added``
(a message's ``content_part.added``, ``output_text.delta``... ``output_text.done``,
``content_part.done``; a call's ``function_call_arguments.delta``... ``.done``),
``output_item.done``, and last ``response.completed`` (``response.incomplete`` when
``max_output_tokens`` cut it; ``error`` + ``response.failed`` when it failed).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

from lorayard.server.api.errors import error_body, status_of
from lorayard.server.api.protocol import ChatCompletionChunk, ChatDelta, ChatTokenLogprob, Usage
from lorayard.server.api.responses_protocol import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    ErrorEvent,
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseEvent,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponseUsage,
    TextDeltaEvent,
    TextDoneEvent,
)
from lorayard.server.api.streaming import record_stream_failure


def response_usage(usage: Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


class ResponseAssembler:
    """One response's output, built from chat chunks (choice 0: a response has one output)."""

    def __init__(self, skeleton: ResponseObject) -> None:
        self.response = skeleton.model_copy(update={"id": _id("resp_"), "created_at": time.time()}, deep=True)
        self._sequence = 0
        self._open: OutputMessage | FunctionCallItem | None = None
        self._calls: dict[int, FunctionCallItem] = {}
        """Chat's tool-call index -> the item it streams into."""
        self._finish: str | None = None

    def _event(self, event_type: type[ResponseEvent], kind: str, **fields: object) -> ResponseEvent:
        event = event_type(type=kind, sequence_number=self._sequence, **fields)
        self._sequence += 1
        return event

    def _lifecycle(self, kind: str) -> ResponseEvent:
        return self._event(ResponseLifecycleEvent, kind, response=self.response.model_copy(deep=True))

    def opening(self) -> list[ResponseEvent]:
        return [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]

    def add(self, chunk: ChatCompletionChunk) -> list[ResponseEvent]:
        """The events one chat chunk adds."""
        if chunk.usage is not None:
            self.response.usage = response_usage(chunk.usage)
        events: list[ResponseEvent] = []
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            logprobs = choice.logprobs.content if choice.logprobs is not None else []
            events += self._delta(choice.delta, logprobs)
            self._finish = choice.finish_reason or self._finish
        return events

    def _delta(self, delta: ChatDelta, logprobs: list[ChatTokenLogprob]) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        if delta.content:
            if not isinstance(self._open, OutputMessage):
                events += self._close() + self._open_message()
            events += self._text(delta.content, logprobs)
        elif logprobs and isinstance(self._open, OutputMessage):
            # tokens whose text is still held back (half a character, a possible stop string)
            self._open.content[0].logprobs += logprobs
        for call in delta.tool_calls or []:
            item = self._calls.get(call.index)
            if item is None:
                events += self._close()
                item = FunctionCallItem(
                    id=_id("fc_"),
                    call_id=call.id or _id("call_"),
                    name=call.function.name or "",
                    arguments="",
                    status="in_progress",
                )
                self._calls[call.index] = item
                events += self._added(item)
            if call.function.arguments:
                item.arguments += call.function.arguments
                events.append(
                    self._event(
                        ArgumentsDeltaEvent,
                        "response.function_call_arguments.delta",
                        item_id=item.id,
                        output_index=self._index(item),
                        delta=call.function.arguments,
                    )
                )
        return events

    def _index(self, item: OutputMessage | FunctionCallItem) -> int:
        return next(i for i, out in enumerate(self.response.output) if out is item)

    def _added(self, item: OutputMessage | FunctionCallItem) -> list[ResponseEvent]:
        self.response.output.append(item)
        self._open = item
        return [
            self._event(
                OutputItemEvent,
                "response.output_item.added",
                output_index=self._index(item),
                item=item.model_copy(deep=True),
            )
        ]

    def _open_message(self) -> list[ResponseEvent]:
        message = OutputMessage(id=_id("msg_"), status="in_progress", content=[])
        events = self._added(message)
        message.content.append(OutputText(text=""))
        events.append(self._part_event("response.content_part.added", message))
        return events

    def _part_event(self, kind: str, message: OutputMessage) -> ResponseEvent:
        return self._event(
            ContentPartEvent,
            kind,
            item_id=message.id,
            output_index=self._index(message),
            content_index=0,
            part=message.content[0].model_copy(),
        )

    def _text(self, text: str, logprobs: list[ChatTokenLogprob]) -> list[ResponseEvent]:
        message = self._open
        assert isinstance(message, OutputMessage)
        message.content[0].text += text
        message.content[0].logprobs += logprobs
        return [
            self._event(
                TextDeltaEvent,
                "response.output_text.delta",
                item_id=message.id,
                output_index=self._index(message),
                content_index=0,
                delta=text,
                logprobs=logprobs,
            )
        ]

    def _close(self) -> list[ResponseEvent]:
        """Finish the open item (its ``.done`` events); a cut output leaves it ``incomplete``."""
        item, self._open = self._open, None
        if item is None:
            return []
        item.status = "incomplete" if self._finish == "length" else "completed"
        index = self._index(item)
        if isinstance(item, OutputMessage):
            events = [
                self._event(
                    TextDoneEvent,
                    "response.output_text.done",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    text=item.content[0].text,
                    logprobs=item.content[0].logprobs,
                ),
                self._part_event("response.content_part.done", item),
            ]
        else:
            events = [
                self._event(
                    ArgumentsDoneEvent,
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=index,
                    name=item.name,
                    arguments=item.arguments,
                )
            ]
        done = item.model_copy(deep=True)
        return [
            *events,
            self._event(OutputItemEvent, "response.output_item.done", output_index=index, item=done),
        ]

    def closing(self) -> list[ResponseEvent]:
        """The last events: the open item done, then ``response.completed`` (or ``.incomplete``)."""
        # An output with nothing in it is still one (empty) message, as OpenAI answers.
        events = [] if self.response.output else self._open_message()
        events += self._close()
        if self._finish == "length":
            self.response.status = "incomplete"
            self.response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
            return [*events, self._lifecycle("response.incomplete")]
        self.response.status = "completed"
        return [*events, self._lifecycle("response.completed")]

    def failed(self, exc: Exception) -> list[ResponseEvent]:
        """A failure after the stream started: OpenAI's ``error`` event, then ``response.failed``."""
        error = error_body(exc)["error"]
        status, _ = status_of(exc)
        code = (
            "server_error" if status >= 500 else "rate_limit_exceeded" if status == 429 else "invalid_prompt"
        )
        self.response.status = "failed"
        self.response.error = ResponseError(code=code, message=error["message"])
        event = self._event(
            ErrorEvent, "error", code=error["code"], message=error["message"], param=error["param"]
        )
        return [event, self._lifecycle("response.failed")]

    async def run(self, chunks: AsyncIterator[ChatCompletionChunk]) -> ResponseObject:
        """The whole response (no events kept): what a request without ``stream`` gets."""
        self.opening()
        async for chunk in chunks:
            self.add(chunk)
        self.closing()
        return self.response


def sse_frame(event: ResponseEvent) -> str:
    """One Responses server-sent event: its type as the SSE ``event``, the event as ``data``."""
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"


async def response_sse(
    assembler: ResponseAssembler,
    chunks: AsyncIterator[ChatCompletionChunk],
    on_error: list[int],
    on_done: Callable[[ResponseObject], None],
) -> AsyncIterator[str]:
    """The stream of a /v1/responses request. A failure after the 200 header is sent as events (its
    status appended to ``on_error`` for the request counter); ``on_done`` gets the finished response."""
    for event in assembler.opening():
        yield sse_frame(event)
    try:
        async for chunk in chunks:
            for event in assembler.add(chunk):
                yield sse_frame(event)
    except Exception as exc:
        record_stream_failure(exc, on_error, "response stream")
        for event in assembler.failed(exc):
            yield sse_frame(event)
        return
    events = assembler.closing()
    on_done(assembler.response)
    for event in events:
        yield sse_frame(event)
