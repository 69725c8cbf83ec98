"""OpenAI Responses API types (``/v1/responses``): the request body, the response object, stream events.

Shapes follow ``openai.types.responses`` (the reference; the server does not import the openai
package). A Responses request is served as a chat request (:mod:`lorayard.server.api.responses_serving`), so
only the fields' own types and ranges are checked here; every rule is chat's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from lorayard.server.api.protocol import ChatTokenLogprob, _Lenient


# -- request -------------------------------------------------------------------------------------
class TextConfig(_Lenient):
    format: dict[str, Any] | None = None
    """``{"type": "text" | "json_object"}`` or ``{"type": "json_schema", "name", "schema", "strict"}``."""
    verbosity: str | None = None


class ResponsesRequest(_Lenient):
    model: str | None = Field(None, description="the base model id, or an adapter: 'name' or 'name@vN'")
    adapter: str | None = Field(None, description="LoRAyard extension, as on chat: wins over model")
    input: str | list[dict[str, Any]] = Field(
        description="text (one user message) or items: messages, function_call, function_call_output"
    )
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    store: bool | None = None
    previous_response_id: str | None = None
    stream: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, max_length=256)
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


# Input items, parsed one by one so an error names the item (``input.3.call_id``).
class InputText(_Lenient):
    type: Literal["input_text", "output_text"]
    text: str


class InputImage(_Lenient):
    type: Literal["input_image"]
    image_url: str | None = None
    """A data: URL (or file:NAME inside the server's --image-dir)."""
    file_id: str | None = None
    detail: str | None = None


class Refusal(_Lenient):
    type: Literal["refusal"]
    refusal: str


class InputMessage(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]


class FunctionCallInput(_Lenient):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputInput(_Lenient):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[dict[str, Any]]


class FunctionTool(_Lenient):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


# -- the response object -------------------------------------------------------------------------
ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[ChatTokenLogprob] = Field(default_factory=list)
    """With ``include: ["message.output_text.logprobs"]``: per token, chat's own entries (the same shape)."""


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""
    status: ItemStatus


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: float
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    instructions: str | None = None
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    top_logprobs: int | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    usage: ResponseUsage | None = None
    truncation: Literal["disabled"] = "disabled"
    background: bool = False
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    service_tier: str = "default"

    def output_text(self) -> str:
        return "".join(
            part.text for item in self.output if isinstance(item, OutputMessage) for part in item.content
        )


class InputItemList(BaseModel):
    """``GET /v1/responses/{id}/input_items``: one page of a response's input items (OpenAI's cursor
    page: ``after`` an item id gives the next)."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


# -- stream events (each carries its ``sequence_number``) -----------------------------------------
class _Event(BaseModel):
    type: str
    sequence_number: int


class ResponseLifecycleEvent(_Event):
    """response.created / in_progress / completed / incomplete / failed."""

    response: ResponseObject


class OutputItemEvent(_Event):
    """response.output_item.added / done."""

    output_index: int
    item: OutputItem


class ContentPartEvent(_Event):
    """response.content_part.added / done."""

    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(_Event):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[ChatTokenLogprob] = Field(default_factory=list)


class TextDoneEvent(_Event):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[ChatTokenLogprob] = Field(default_factory=list)


class ArgumentsDeltaEvent(_Event):
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(_Event):
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(_Event):
    code: str | None
    message: str
    param: str | None


ResponseEvent = (
    ResponseLifecycleEvent
    | OutputItemEvent
    | ContentPartEvent
    | TextDeltaEvent
    | TextDoneEvent
    | ArgumentsDeltaEvent
    | ArgumentsDoneEvent
    | ErrorEvent
)
