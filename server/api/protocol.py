"""OpenAI request types (plus vLLM's extensions), validated by pydantic; a bad field -> 400 naming it."""

from __future__ import annotations

from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Lenient(BaseModel):
    # OpenAI clients send fields we don't use (response_format, metadata, ...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingFields(_Lenient):
    """Fields shared by chat and completions."""

    model: str | None = Field(None, description="the base model id, or an adapter name")
    adapter: str | None = Field(None, description="adapter to use: 'name' (LATEST) or 'name@vN'")
    max_tokens: int | None = Field(None, ge=1)
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


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(description="text, or token ids")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("only one prompt per request is supported")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        # pydantic matched one arm of the union: a list not of strings is the list[int] one
        return cast(str | list[int], value)


class LoadLoraRequest(_Lenient):
    lora_name: str
    lora_path: str | None = None


class UnloadLoraRequest(_Lenient):
    lora_name: str
