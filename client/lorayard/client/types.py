"""Result types returned by the client: plain pydantic models of the OpenAI wire format."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Usage(BaseModel):
    """Token counts as the server reports them."""

    model_config = ConfigDict(extra="allow")

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class GenerationResult(BaseModel):
    """One finished chat or text completion (the first choice)."""

    text: str
    finish_reason: str | None = None
    """``stop`` (end of turn or a stop string), ``length`` (max_tokens), or the server's own value."""
    usage: Usage | None = None
    model: str | None = None
    """The model id the server answered with."""
    adapter: str | None = None
    """The adapter the request asked for (``name`` or ``name@vN``); None for the base model."""
    id: str | None = None
    """The server's response id."""


class ModelInfo(BaseModel):
    """One entry of ``GET /v1/models``; extra server-specific fields are kept."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    root: str | None = None
    parent: str | None = None
    """The base model an adapter sits on; None for a base model."""
    max_model_len: int | None = None

    @property
    def is_adapter(self) -> bool:
        """Adapters name their base as ``parent`` (vLLM's convention, which we follow)."""
        return self.parent is not None

    @property
    def extra_fields(self) -> dict[str, Any]:
        """Server-specific fields beyond the OpenAI/vLLM ones (versions, loaded, ...)."""
        return dict(self.model_extra or {})


class AdapterOperationResult(BaseModel):
    """What the server said to a load/unload request (JSON fields, or its plain-text message)."""

    model_config = ConfigDict(extra="allow")

    message: str | None = None
    fields: dict[str, Any] = Field(default_factory=dict)
