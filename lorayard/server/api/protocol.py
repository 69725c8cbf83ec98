"""OpenAI request and response types (plus vLLM's extensions).

Requests: pydantic checks each field's own type and range (a bad one -> 400 naming it); every check
that needs the server (vocabulary, limits, adapters, schemas) is in :mod:`lorayard.server.api.serving`.
Responses and stream chunks are typed here too, so chat and completions build them one way.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer


def _lone_surrogate(value: Any) -> bool:
    """True when a string in ``value`` (any nesting) holds a lone UTF-16 surrogate: JSON's "\\ud800"
    parses to one, and it is no character (the tokenizer and every encoder fail on it)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


class _Lenient(BaseModel):
    # OpenAI clients send fields we don't use (user, metadata, ...): accept and ignore them. Fields we
    # cannot honour are refused by name in lorayard.server.api.serving (REFUSED_FIELDS), never dropped
    # silently.
    model_config = ConfigDict(extra="allow")

    @field_validator("*", mode="before")
    @classmethod
    def _unicode_text(cls, value: Any) -> Any:
        if _lone_surrogate(value):
            raise ValueError("contains a lone surrogate (\\ud800-\\udfff), which is not Unicode text")
        return value

    def extra_fields(self) -> set[str]:
        return set(self.model_extra or ())


# -- requests ------------------------------------------------------------------------------------
class ImageURL(_Lenient):
    url: str
    detail: str | None = None
    """OpenAI's low/high/auto: accepted, and the base's image processor decides the resolution."""


class ContentPart(_Lenient):
    """A part of a message's content: ``text``, and ``image_url`` on a vision-language base; other
    types (audio, files) are refused by name in :func:`lorayard.server.api.serving.conversation`."""

    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCallIn(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"
    """JSON text, as OpenAI sends it (an object is accepted too, as some clients send one)."""


class ToolCallIn(_Lenient):
    """A call an assistant turn made, replayed by the client."""

    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Lenient):
    """OpenAI's message: ``developer`` is a system turn; an assistant turn may carry ``tool_calls`` with
    ``content`` null or empty; a ``tool`` turn answers one of them by ``tool_call_id``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # "schema" shadows a BaseModel attribute: kept under another name, spelled "schema" on the wire.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class SamplingFields(_Lenient):
    """Fields shared by chat and completions."""

    model: str | None = Field(None, description="the base model id, or an adapter name")
    adapter: str | None = Field(None, description="adapter to use: 'name' (LATEST) or 'name@vN'")
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo (score the prompt)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1: off")
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # A near-zero penalty divides logits into inf (NaN probabilities): bound it away from 0.
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in -100..100 added to its logit"
    )
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: generate through end-of-turn")
    min_tokens: int = Field(0, ge=0, description="vLLM extension: no stop before this many tokens")
    stop_token_ids: list[int] | None = None
    user: str | None = Field(
        None, max_length=256, description="end-user id: keeps them on one version of a canary split"
    )

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(description="text, or token ids (one prompt per request)")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="vLLM extension: logprobs of the prompt tokens, this many top"
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Prompt) -> str | list[int]:
        # A batch of one (lm-eval and the openai client send prompts as lists) is that prompt.
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            if len(value) != 1:
                raise ValueError("only one prompt per request is supported")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        # a one-element batch was unwrapped above: what is left is one prompt (text or ids)
        return value  # type: ignore[return-value]


class TokenizeRequest(_Lenient):
    """vLLM's /tokenize: a text ``prompt`` or chat ``messages`` (rendered by the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = Field(
        None, description="messages only: rendered as a chat request renders them"
    )
    add_special_tokens: bool = Field(True, description="text prompts only: the tokenizer's own specials")
    add_generation_prompt: bool = Field(True, description="messages only: end with the assistant header")
    return_token_strs: bool = False


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


class LoadLoraRequest(_Lenient):
    lora_name: str
    lora_path: str | None = None

    @field_validator("lora_path")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # No file system takes a NUL in a path (Python raises ValueError on one).
        if value is not None and "\0" in value:
            raise ValueError("contains a NUL character")
        return value


class UnloadLoraRequest(_Lenient):
    lora_name: str


# -- responses -----------------------------------------------------------------------------------
class _DropNones(BaseModel):
    """Serialised without its None fields (stream deltas carry only what changed, as OpenAI's do)."""

    @model_serializer(mode="wrap")
    def _without_nones(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (computed before under the same weights)."""


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token (the first prompt token's is null)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class VllmLogprob(BaseModel):
    """vLLM's per-token entry of ``prompt_logprobs``, keyed by token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[dict[str, VllmLogprob] | None] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None
    """Absent (not ``[]``) on a plain answer, as OpenAI's own responses, which it refuses replayed."""

    @model_serializer(mode="wrap")
    def _without_empty_calls(self, handler: Any) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if not out.get("tool_calls"):
            out.pop("tool_calls", None)
        return out


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(_DropNones):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_DropNones):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(_DropNones):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
