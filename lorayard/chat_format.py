"""Messages -> token ids: the ONE chat-format source for training and serving.

We use the base tokenizer's own chat template unchanged (its default system prompt included). The
server calls :func:`render_prompt`; the training job calls :func:`render_conversation`, which builds
every assistant turn as ``render_prompt(messages before it) + tokens of the turn``, so the prompt a
model is trained on and the prompt it is served are the same ids.

A base without a chat template (GPT-2, OPT, most raw checkpoints) gets a *prompt template*: a Jinja
chat template in HF's own format, either the user's or :data:`DEFAULT_PROMPT_TEMPLATE`. The training
job records it in the adapter's manifest and the server passes it back here for that adapter's chat
requests, so both sides still render through these functions. Completion-style data on such a base
needs no template at all: :func:`render_completion` is raw prompt + completion + EOS, what
``/v1/completions`` sends and stops at.

Tools: OpenAI's ``tools`` and conversations with assistant ``tool_calls`` and ``tool`` results render
through the template's own tools support when it has one (``apply_chat_template(tools=...)``), else in
our documented default format (:mod:`lorayard.tool_format`: the schemas in the system turn, calls as
Hermes ``<tool_call>`` text in the assistant turn, results as a user turn of ``<tool_response>``s).
Either way training and serving render the same ids, calls included.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict

from lorayard.tool_format import (
    DEFAULT_TOOL_FORMAT,
    ToolFormat,
    template_knows_tools,
    tool_response_text,
    tools_system_text,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")


class FunctionCallText(TypedDict):
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""


class ToolCallEntry(TypedDict):
    """One call of an assistant turn, in OpenAI's shape."""

    id: str
    type: Literal["function"]
    function: FunctionCallText


class Message(TypedDict):
    role: Role
    content: str
    """Text; an assistant turn that only calls tools has ``""``."""
    tool_calls: NotRequired[list[ToolCallEntry]]
    """Assistant turns: the calls it made."""
    tool_call_id: NotRequired[str]
    """Tool turns: the call this is the result of."""


ToolSpec = dict[str, Any]
"""One OpenAI tool: ``{"type": "function", "function": {"name", "description", "parameters"}}``."""


DEFAULT_PROMPT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
"""The layout for chat data on a base without a chat template::

    SYSTEM\n\n### User:\nUSER\n\n### Assistant:\nREPLY<eos>\n\n### User:\n...

Each reply ends with the tokenizer's EOS token, which training puts inside the loss and the server
stops at."""


class ChatFormatError(ValueError):
    """A conversation the template cannot render (empty, bad role, no assistant turn to train on)."""


@dataclass(frozen=True)
class RenderedExample:
    """One training example: ``labels_mask[i]`` is 1 where token ``ids[i]`` is trained on."""

    ids: list[int]
    labels_mask: list[int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ToolContext:
    """The tools a conversation may call and the call format they are written in."""

    tools: tuple[ToolSpec, ...] = ()
    format: ToolFormat = DEFAULT_TOOL_FORMAT


NO_TOOLS = ToolContext()


def _template_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool,
    prompt_template: str | None,
    tools: ToolContext = NO_TOOLS,
) -> str:
    template = prompt_template if prompt_template is not None else tokenizer.chat_template
    if template is None:
        raise ChatFormatError(
            "the base tokenizer has no chat template: send raw text to /v1/completions, or use an adapter "
            "trained with a prompt template"
        )
    tool_list: list[dict[Any, Any]] | None = None
    conversation: list[dict[str, Any]]
    if template_knows_tools(template):
        conversation, tool_list = [_native_message(m) for m in messages], list(tools.tools) or None
    else:
        conversation = list(_default_tool_messages(messages, tools))
    text = tokenizer.apply_chat_template(
        conversation,
        tools=tool_list,  # type: ignore[arg-type]  # transformers' list is invariant in its items
        chat_template=prompt_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    return str(text)


def _native_message(message: Message) -> dict[str, Any]:
    """For a template with tools support: arguments as objects, as HF templates expect them."""
    out: dict[str, Any] = {"role": message["role"], "content": message["content"]}
    if "tool_call_id" in message:
        out["tool_call_id"] = message["tool_call_id"]
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": _arguments(call)},
            }
            for call in message["tool_calls"]
        ]
    return out


def _arguments(call: ToolCallEntry) -> Any:
    try:
        return json.loads(call["function"]["arguments"])
    except ValueError:
        return call["function"]["arguments"]


def _default_tool_messages(messages: Sequence[Message], tools: ToolContext) -> list[dict[str, str]]:
    """For a template without tools support: plain system/user/assistant turns in our default format
    (schemas in the system turn, calls as text, consecutive tool results as one user turn)."""
    fmt = tools.format
    out: list[dict[str, str]] = []
    results: list[str] = []
    for message in messages:
        if message["role"] == "tool":
            results.append(message["content"])
            continue
        if results:
            out.append({"role": "user", "content": tool_response_text(results)})
            results = []
        content = message["content"]
        if message.get("tool_calls"):
            calls = fmt.separator.join(
                fmt.render_call(c["function"]["name"], c["function"]["arguments"])
                for c in message["tool_calls"]
            )
            content = f"{content}\n{calls}" if content else calls
        out.append({"role": message["role"], "content": content})
    if results:
        out.append({"role": "user", "content": tool_response_text(results)})
    if tools.tools:
        text = tools_system_text(list(tools.tools), fmt)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def chat_template_for(tokenizer: PreTrainedTokenizerBase, prompt_template: str | None) -> str | None:
    """The prompt template chat data is rendered with: the user's, else none when the base has a chat
    template of its own (it is used), else :data:`DEFAULT_PROMPT_TEMPLATE`."""
    if prompt_template is not None or tokenizer.chat_template is not None:
        return prompt_template
    return DEFAULT_PROMPT_TEMPLATE


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Plain text -> ids, no special tokens added (the template writes its own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def validate_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ChatFormatError("messages is empty")
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise ChatFormatError(
                f"messages[{i}].role must be one of {list(ROLES)}, not {message.get('role')!r}"
            )
        if not isinstance(message.get("content"), str):
            raise ChatFormatError(f"messages[{i}].content must be a string")
        if message.get("tool_calls") and message["role"] != "assistant":
            raise ChatFormatError(f"messages[{i}].tool_calls: only assistant messages carry tool calls")


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    prompt_template: str | None = None,
    tools: ToolContext = NO_TOOLS,
) -> list[int]:
    """The serving prompt: the template (``prompt_template`` if given, else the tokenizer's) with
    ``add_generation_prompt=True``, as ids."""
    validate_messages(messages)
    text = _template_text(
        tokenizer, messages, add_generation_prompt=True, prompt_template=prompt_template, tools=tools
    )
    return encode_text(tokenizer, text)


def render_completion(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> RenderedExample:
    """A completion-style example for a base without a chat template: ``encode(prompt)`` (exactly the
    ids ``/v1/completions`` sends for that prompt), then the completion and EOS, both trained."""
    if tokenizer.eos_token_id is None:
        raise ChatFormatError("the base tokenizer has no EOS token to end a completion with")
    prompt_ids = encode_text(tokenizer, prompt)
    if not prompt_ids:
        raise ChatFormatError("the prompt encodes to no tokens")
    completion_ids = [*encode_text(tokenizer, completion), tokenizer.eos_token_id]
    return RenderedExample(
        ids=prompt_ids + completion_ids, labels_mask=[0] * len(prompt_ids) + [1] * len(completion_ids)
    )


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    train_on_all_assistant_turns: bool = True,
    prompt_template: str | None = None,
    tools: ToolContext = NO_TOOLS,
) -> RenderedExample:
    """A training example: prompts masked, assistant turns (with their end-of-turn token) trained.

    Each assistant turn at index ``i`` contributes ``render_prompt(messages[:i])`` (the ids the server
    would send) followed by the template's text of that turn up to and including the end-of-turn token.
    Tokens after the end-of-turn token (the template's newline) are kept but not trained: generation
    stops at end-of-turn, so the model never emits them.
    """
    validate_messages(messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ChatFormatError("a training conversation needs at least one assistant message")
    if not train_on_all_assistant_turns:
        turns = turns[-1:]
    eos_ids = _end_of_turn_ids(tokenizer)
    ids: list[int] = []
    mask: list[int] = []
    covered_text = ""
    for turn in turns:
        prompt_text = _template_text(
            tokenizer,
            messages[:turn],
            add_generation_prompt=True,
            prompt_template=prompt_template,
            tools=tools,
        )
        full_text = _template_text(
            tokenizer,
            messages[: turn + 1],
            add_generation_prompt=False,
            prompt_template=prompt_template,
            tools=tools,
        )
        if not prompt_text.startswith(covered_text) or not full_text.startswith(prompt_text):
            raise ChatFormatError("the chat template is not prefix-stable; cannot mask prompts reliably")
        prompt_piece = encode_text(tokenizer, prompt_text[len(covered_text) :])
        completion = encode_text(tokenizer, full_text[len(prompt_text) :])
        trained = _trained_prefix_length(completion, eos_ids)
        ids += prompt_piece + completion
        mask += [0] * len(prompt_piece) + [1] * trained + [0] * (len(completion) - trained)
        covered_text = full_text
    return RenderedExample(ids=ids, labels_mask=mask)


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>")
"""Tokens that end an assistant turn besides the tokenizer's EOS, where the vocabulary has them:
ChatML's ``<|im_end|>``; Llama 3's ``<|eot_id|>`` (the EOS of its instruct tokenizers, not of its
base ones) and ``<|eom_id|>``, which ends a turn that called a built-in tool (``<|python_tag|>``)
or any call in Meta's ``ipython`` mode and which Meta's generation config stops at too: without
it a call would run on into whatever the model writes next."""


def _end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def _trained_prefix_length(completion: list[int], eos_ids: set[int]) -> int:
    """Up to and including the last end-of-turn token; the whole turn if the template writes none."""
    for i in range(len(completion) - 1, -1, -1):
        if completion[i] in eos_ids:
            return i + 1
    return len(completion)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end generation: the same end-of-turn ids training puts inside the loss."""
    return _end_of_turn_ids(tokenizer)
