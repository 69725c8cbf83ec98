"""/v1/responses -> the chat request it means -> chat's :class:`EngineJob`. No rule of its own.

A Responses body (``input`` items, ``instructions``, function ``tools``, ``text.format``,
``max_output_tokens``, ``previous_response_id``) is translated into a
:class:`ChatCompletionRequest` and validated by :func:`chat_job`, so chat and Responses accept and
refuse exactly the same things; an error chat raises is renamed to the Responses field it came from
(``messages.3`` -> ``input.2``, ``response_format.json_schema.schema`` -> ``text.format.schema``).
What only Responses could ask for and we cannot do (built-in tools, background, conversations,
reasoning) is refused here by name.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from lorayard.server.api.errors import APIError, as_api_error
from lorayard.server.api.protocol import ChatCompletionRequest
from lorayard.server.api.responses_protocol import (
    FunctionCallInput,
    FunctionCallItem,
    FunctionCallOutputInput,
    FunctionTool,
    InputImage,
    InputItemList,
    InputMessage,
    InputText,
    Refusal,
    ResponseObject,
    ResponsesRequest,
)
from lorayard.server.api.serving import EngineJob, chat_job

if TYPE_CHECKING:
    from lorayard.server.api.response_store import ResponseStore, StoredResponse
    from lorayard.server.runtime import ReadyRuntime

RESPONSES_REFUSED: dict[str, str] = {
    "background": "background responses are not supported: send the request without it (the answer comes"
    " when it is done, or stream it)",
    "conversation": "the Conversations API is not supported: continue with `previous_response_id`",
    "prompt": "stored prompt templates are not supported: send `input` and `instructions`",
    "reasoning": "reasoning options are not supported: the served models do not reason",
    "truncation": "truncation 'auto' is not supported: nothing is dropped from the input; send a shorter one",
    "context_management": "context management (compaction) is not supported: send a shorter input",
    # chat's spellings of what Responses names otherwise
    "messages": "/v1/responses takes `input` (a string or items), not `messages`",
    "response_format": "/v1/responses takes `text.format`, not `response_format`",
    "max_tokens": "/v1/responses takes `max_output_tokens`, not `max_tokens`",
    "max_completion_tokens": "/v1/responses takes `max_output_tokens`, not `max_completion_tokens`",
    "n": "one output per response: send several requests",
    "logprobs": '/v1/responses takes `include: ["message.output_text.logprobs"]` and `top_logprobs`',
}
"""Fields a Responses client may send that we cannot honour: a 400 saying what to send instead,
unless they carry their no-op value."""

_NO_OP_VALUES: dict[str, tuple[object, ...]] = {
    "background": (False,),
    "truncation": ("disabled",),
    "n": (1,),
    "reasoning": ({}, {"effort": None}, {"effort": None, "summary": None}, {"effort": "none"}),
}

_NOT_FOR_CHAT = frozenset(
    {
        "stream_options",
        "max_tool_calls",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "safety_identifier",
        "service_tier",
    }
)
"""Responses fields that change nothing here (``max_tool_calls`` bounds built-in tools, which we have
none of), so they are not handed on to chat. Every other unknown field is: chat refuses or uses it
(``seed``, ``top_k``, ``stop``, ``logit_bias``, ...) as it does on /v1/chat/completions."""

LOGPROBS_INCLUDE = "message.output_text.logprobs"
_INCLUDABLE = frozenset({LOGPROBS_INCLUDE, "reasoning.encrypted_content"})
"""``include`` values we honour: logprobs, and one that asks for nothing we produce (there are no
reasoning items)."""

_Model = TypeVar("_Model", bound=BaseModel)


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def _parsed(model: type[_Model], raw: Any, where: str) -> _Model:
    """``raw`` as ``model``, or a 400 naming the first bad field under ``where``."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join([where, *(str(p) for p in first["loc"])])
        raise _bad(param, first["msg"]) from None


# -- input items -> chat messages ----------------------------------------------------------------
def _message_content(content: str | list[dict[str, Any]], where: str) -> str | list[dict[str, Any]]:
    """A message's content: its text, or with ``input_image`` parts chat's text and image_url parts
    (an image's URL is a data: URL, or file: with --image-dir; chat_job decides whether the base reads
    images, and refuses them by name otherwise)."""
    if isinstance(content, str) or not any(
        isinstance(p, dict) and p.get("type") == "input_image" for p in content
    ):
        return _text_of(content, where)
    parts: list[dict[str, Any]] = []
    for j, raw in enumerate(content):
        if raw.get("type") == "input_image":
            image = _parsed(InputImage, raw, f"{where}.{j}")
            if image.image_url is None:
                raise _bad(
                    f"{where}.{j}.image_url", "required: file_id images are not supported", "unsupported"
                )
            parts.append({"type": "image_url", "image_url": {"url": image.image_url}})
        else:
            parts.append({"type": "text", "text": _text_of([raw], f"{where}.{j}")})
    return parts


def _text_of(content: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, raw in enumerate(content):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind in ("input_file", "input_audio"):
            raise _bad(f"{where}.{j}", f"{kind} is not supported: the served models read text", "unsupported")
        if kind == "input_image":  # in a function_call_output
            raise _bad(f"{where}.{j}", "images are accepted in message content only", "unsupported")
        if kind == "refusal":
            texts.append(_parsed(Refusal, raw, f"{where}.{j}").refusal)
        else:
            texts.append(_parsed(InputText, raw, f"{where}.{j}").text)
    return "".join(texts)


def _call_message(messages: list[dict[str, Any]], continues: bool) -> dict[str, Any]:
    """The assistant turn a function_call item joins: the one just before it when the item before
    was the assistant's (its text, or another call of the same turn), else a new one."""
    if continues and messages and messages[-1]["role"] == "assistant":
        return messages[-1]
    messages.append({"role": "assistant", "content": None})
    return messages[-1]


def input_messages(items: str | list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """``input`` -> chat messages (OpenAI's chat shape) and, per message, the item it came from."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}], ["input"]
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    previous_kind = None
    for i, raw in enumerate(items):
        where = f"input.{i}"
        kind = raw.get("type", "message")
        count = len(messages)
        if kind == "message":
            message = _parsed(InputMessage, raw, where)
            role = "system" if message.role == "developer" else message.role
            messages.append({"role": role, "content": _message_content(message.content, f"{where}.content")})
        elif kind == "function_call":
            call = _parsed(FunctionCallInput, raw, where)
            turn = _call_message(messages, previous_kind in ("assistant", "function_call"))
            turn.setdefault("tool_calls", []).append(
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
            )
        elif kind == "function_call_output":
            result = _parsed(FunctionCallOutputInput, raw, where)
            content = _text_of(result.output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": result.call_id, "content": content})
        else:
            raise _bad(
                f"{where}.type",
                f"input items of type {kind!r} are not supported: send messages, function_call and"
                " function_call_output items",
                "unsupported",
            )
        origins += [where] * (len(messages) - count)
        previous_kind = "assistant" if kind == "message" and messages[-1]["role"] == "assistant" else kind
    return messages, origins


def listed_input_items(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input`` as ``GET /v1/responses/{id}/input_items`` lists it: OpenAI's item shapes, each with an
    id (its own when the client sent one). A string is one user message; an assistant message's text
    is ``output_text``, as OpenAI lists it. ``items`` were checked by :func:`input_messages`."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    listed = []
    for raw in items:
        kind = raw.get("type", "message")
        item: dict[str, Any] = {"id": raw.get("id") or _item_id(kind), "type": kind, "status": "completed"}
        if kind == "message":
            part = "output_text" if raw["role"] == "assistant" else "input_text"
            content = raw["content"]
            if isinstance(content, str):
                content = [{"type": part, "text": content}]
            if raw["role"] == "assistant":
                content = [{"annotations": [], **p} if p.get("type") == "output_text" else p for p in content]
            item |= {"role": raw["role"], "content": content}
        elif kind == "function_call":
            item |= {"call_id": raw["call_id"], "name": raw["name"], "arguments": raw["arguments"]}
        else:
            item |= {"call_id": raw["call_id"], "output": raw["output"]}
        listed.append(item)
    return listed


def input_item_page(
    stored: StoredResponse, limit: int, order: Literal["asc", "desc"], after: str | None
) -> InputItemList:
    """One page of a stored response's input items: ``order`` (``desc``: newest first, OpenAI's
    default), at most ``limit``, starting after the item ``after`` names."""
    items = list(stored.input_items)
    if order == "desc":
        items.reverse()
    ids = [item["id"] for item in items]
    if after is not None and after not in ids:
        raise _bad("after", f"no input item {after!r} in response {stored.response.id!r}")
    start = 0 if after is None else ids.index(after) + 1
    page = items[start : start + limit]
    return InputItemList(
        data=page,
        first_id=page[0]["id"] if page else None,
        last_id=page[-1]["id"] if page else None,
        has_more=start + limit < len(items),
    )


def _item_id(kind: str) -> str:
    prefix = {"message": "msg_", "function_call": "fc_"}.get(kind, "fco_")
    return prefix + uuid.uuid4().hex


def output_messages(response: ResponseObject) -> list[dict[str, Any]]:
    """A response's output as the chat turn it was: its text and its calls, one assistant message."""
    text = response.output_text()
    calls = [
        {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
        for item in response.output
        if isinstance(item, FunctionCallItem)
    ]
    if not calls:
        return [{"role": "assistant", "content": text}]
    return [{"role": "assistant", "content": text or None, "tool_calls": calls}]


# -- tools, tool_choice, text.format -> chat's fields --------------------------------------------
def _chat_tools(tools: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Function tools -> chat's ``tools``, and the tools as the response echoes them."""
    chat, echoed = [], []
    for i, raw in enumerate(tools):
        kind = raw.get("type")
        if kind != "function":
            raise _bad(
                f"tools.{i}.type",
                f"{kind!r} tools are not supported: only function tools (type 'function') are; built-in"
                " tools (web search, file search, code interpreter, computer use, MCP, ...) do not run here",
                "unsupported",
            )
        tool = _parsed(FunctionTool, raw, f"tools.{i}")
        parameters = tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
        function: dict[str, Any] = {
            "name": tool.name,
            "description": tool.description,
            "parameters": parameters,
        }
        if tool.strict is not None:
            function["strict"] = tool.strict
        chat.append({"type": "function", "function": function})
        echoed.append({"type": "function", **function, "strict": tool.strict})
    return chat, echoed


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        if not isinstance(choice.get("name"), str):
            raise _bad("tool_choice.name", "the function's name is required")
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad(
        "tool_choice",
        "only 'none', 'auto', 'required' and {'type': 'function', 'name': ...} are supported",
        "unsupported",
    )


def _chat_response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    if body.text is None:
        return None
    if body.text.verbosity not in (None, "medium"):
        raise _bad(
            "text.verbosity", "only 'medium' is supported: the served models have no verbosity control"
        )
    fmt = body.text.format
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind != "json_schema":
        raise _bad("text.format.type", "must be 'text', 'json_object' or 'json_schema'")
    if "schema" not in fmt:
        raise _bad("text.format.schema", "required when type is json_schema")
    fields = {k: fmt[k] for k in ("name", "schema", "description", "strict") if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": fields}


def _refuse_unsupported(body: ResponsesRequest) -> dict[str, Any]:
    """Refuse what we cannot honour; the unknown fields left for chat."""
    extras = body.model_extra or {}
    for name in sorted(extras):
        value = extras[name]
        if name in RESPONSES_REFUSED and value is not None and value not in _NO_OP_VALUES.get(name, ()):
            raise APIError(400, RESPONSES_REFUSED[name], param=name, code="unsupported_field")
    for value in body.include or []:
        if value not in _INCLUDABLE:
            raise APIError(
                400,
                f"include: {value!r} is not supported (only {sorted(_INCLUDABLE)})",
                param="include",
                code="unsupported_field",
            )
    return {k: v for k, v in extras.items() if k not in RESPONSES_REFUSED and k not in _NOT_FOR_CHAT}


# -- chat's errors, named as the Responses fields -----------------------------------------------
def responses_param(param: str | None, origins: list[str]) -> str | None:
    """The Responses field a chat field came from (``origins``: each chat message's item)."""
    if param is None:
        return None
    head, _, rest = param.partition(".")
    if head == "messages":
        index, _, inner = rest.partition(".")
        if not (index.isdigit() and int(index) < len(origins)):
            return "input"
        origin = origins[int(index)]
        # A message item's content parts are chat's, one for one (an image part included).
        if inner.startswith("content.") and origin.startswith("input."):
            # chat's image_url.url is the Responses part's image_url
            return f"{origin}.{inner.removesuffix('.url') if inner.endswith('.image_url.url') else inner}"
        return origin
    if head == "response_format":
        rest = rest.removeprefix("json_schema").removeprefix(".")
        return "text.format" + (f".{rest}" if rest else "")
    if head in ("tools", "tool_choice"):
        return param.replace(".function.", ".").replace(".function", "")
    if head in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    if head == "logprobs":
        return "include"
    return param


def _renamed(exc: APIError, origins: list[str]) -> APIError:
    param = responses_param(exc.param, origins)
    if param == exc.param:
        return exc
    message = exc.message
    if exc.param is not None and message.startswith(f"{exc.param}:"):
        message = f"{param}:{message[len(exc.param) + 1 :]}"
    return APIError(exc.status, message, param=param, code=exc.code)


# -- the turn ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResponsesTurn:
    """One /v1/responses request as chat serves it, and what the response echoes and stores."""

    job: EngineJob
    conversation: list[dict[str, Any]]
    """The messages a follow-up continues from, before this output: the previous response's, then
    this input (``instructions`` apply to this request only, as on OpenAI)."""
    origins: list[str]
    """Per chat message: the Responses field it came from, for an error's ``param``."""
    skeleton: ResponseObject
    """The response before any output (``model`` echoes the body until the lease names a version)."""
    store: bool
    input_items: list[dict[str, Any]]
    """This request's ``input``, as ``GET /v1/responses/{id}/input_items`` lists it."""

    @contextlib.contextmanager
    def errors_named(self) -> Iterator[None]:
        """Errors raised while the chat job starts, renamed to this body's fields."""
        try:
            yield
        except Exception as exc:
            known = as_api_error(exc)
            if known is None:
                raise
            raise _renamed(known, self.origins) from exc

    def remember(self, store: ResponseStore, owner: str, response: ResponseObject) -> None:
        if self.store:
            store.put(owner, response, [*self.conversation, *output_messages(response)], self.input_items)


def _conversation(
    body: ResponsesRequest, store: ResponseStore, owner: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """The previous response's conversation (if any), then this input; per message, its origin."""
    conversation: list[dict[str, Any]] = []
    origins: list[str] = []
    if body.previous_response_id is not None:
        previous = store.get(owner, body.previous_response_id)
        if previous is None:
            raise _bad(
                "previous_response_id",
                f"no stored response {body.previous_response_id!r} (it expired, was deleted, was made"
                " with `store: false` or with another API key, or on another server): send the whole"
                " conversation as `input`",
                "previous_response_not_found",
            )
        conversation += previous.conversation
        origins += ["previous_response_id"] * len(previous.conversation)
    new_messages, new_origins = input_messages(body.input)
    return conversation + new_messages, origins + new_origins


def _chat_fields(
    body: ResponsesRequest,
    passthrough: dict[str, Any],
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
) -> dict[str, Any]:
    """The chat body this request means (unvalidated: chat's models and rules check it);
    ``passthrough``: the unknown fields chat gets as sent."""
    fields = {
        **passthrough,
        "model": body.model,
        "adapter": body.adapter,
        "messages": messages,
        "tools": tools or None,
        "tool_choice": _chat_tool_choice(body.tool_choice),
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _chat_response_format(body),
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "user": body.user,
        # logprobs: OpenAI returns them when they are included or top alternatives are asked for
        "logprobs": LOGPROBS_INCLUDE in (body.include or []) or bool(body.top_logprobs) or None,
        "top_logprobs": body.top_logprobs,
        # Responses are built from chat's stream, whether or not the client streams.
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return {k: v for k, v in fields.items() if v is not None}


def _skeleton(
    body: ResponsesRequest, chat: ChatCompletionRequest, model: str, tools: list[dict[str, Any]]
) -> ResponseObject:
    """The response before any output: what it echoes of the request."""
    return ResponseObject(
        id="",
        created_at=0.0,
        status="in_progress",
        model=model,
        instructions=body.instructions,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        tool_choice=body.tool_choice or "auto",
        tools=tools,
        text={"format": (body.text.format if body.text and body.text.format else {"type": "text"})},
        temperature=chat.temperature,
        top_p=chat.top_p,
        max_output_tokens=body.max_output_tokens,
        top_logprobs=body.top_logprobs,
        previous_response_id=body.previous_response_id,
        store=body.store is not False,
        metadata=body.metadata or {},
        user=body.user,
    )


def responses_turn(
    body: ResponsesRequest, runtime: ReadyRuntime, store: ResponseStore, owner: str
) -> ResponsesTurn:
    """Translate, then let :func:`chat_job` validate; 400s name the Responses field."""
    passthrough = _refuse_unsupported(body)
    conversation, origins = _conversation(body, store, owner)
    messages = list(conversation)
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
        origins.insert(0, "instructions")
    tools, echoed_tools = _chat_tools(body.tools or [])
    try:
        chat = ChatCompletionRequest.model_validate(_chat_fields(body, passthrough, messages, tools))
        job = chat_job(chat, runtime)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise _renamed(_bad(param, first["msg"]), origins) from None
    except APIError as exc:
        raise _renamed(exc, origins) from None
    guided_param = "text.format" if job.guided_param == "response_format" else job.guided_param
    return ResponsesTurn(
        job=replace(job, guided_param=guided_param),
        conversation=conversation,
        origins=origins,
        skeleton=_skeleton(body, chat, job.model, echoed_tools),
        store=body.store is not False,
        input_items=listed_input_items(body.input),
    )
