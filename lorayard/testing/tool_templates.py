"""Chat templates that write tool calls in a family's native format, for tiny bases of that family.

The embedded base's template knows no tools (our default format serves it); these stand in for the
real templates of Mistral (v11+), Llama 3.1 and Qwen 2.5 (Hermes), trimmed to what decides the
format: where the tool schemas go, how an assistant turn spells its calls, how a tool result comes
back. Their markers are added to the tokenizer as the real tokenizers have them (special tokens for
Mistral and Llama, plain added tokens for Qwen), so a served test meets what a real base does:
``[TOOL_CALLS]`` is one special token, skipped by a plain decode.

    python -m lorayard.testing.tool_templates OUT --family mistral [--like FOLDER]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TemplateFamily:
    """A family's chat template, its special tokens, and the base architecture it comes with."""

    model_type: str
    template: str
    special_tokens: tuple[str, ...]
    eos_token: str | None = None
    """The end of an assistant turn, when it is not the source tokenizer's EOS."""
    added_tokens: tuple[str, ...] = ()
    """Whole tokens that are not special (Qwen's ``<tool_call>``: a plain decode keeps them)."""


MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0].role == 'system' %}"
    "[SYSTEM_PROMPT]{{ messages[0].content }}[/SYSTEM_PROMPT]"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message.role == 'user' %}[INST]{{ message.content }}[/INST]"
    "{% elif message.role == 'assistant' %}{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}"
    "{% set arguments = call.function.arguments %}"
    "{% if arguments is not string %}{% set arguments = arguments | tojson %}{% endif %}"
    "{{ '[TOOL_CALLS]' + call.function.name + '[ARGS]' + arguments }}"
    "{% endfor %}{{ eos_token }}"
    "{% elif message.role == 'tool' %}[TOOL_RESULTS]{{ message.content }}[/TOOL_RESULTS]"
    "{% endif %}"
    "{% endfor %}"
)
"""Mistral Small 3.1+ (tokenizer v11+): calls as ``[TOOL_CALLS]NAME[ARGS]{...}``, the turn ended by
EOS; the model answers right after ``[/INST]`` or ``[/TOOL_RESULTS]`` (no generation prompt)."""

MISTRAL = TemplateFamily(
    model_type="mistral",
    template=MISTRAL_TEMPLATE,
    special_tokens=(
        "[INST]",
        "[/INST]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
        "[AVAILABLE_TOOLS]",
        "[/AVAILABLE_TOOLS]",
        "[TOOL_CALLS]",
        "[ARGS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
    ),
)

LLAMA31_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0].role == 'system' %}"
    "{% set system = messages[0].content %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\n{{ system }}<|eot_id|>"
    "{% for message in loop_messages %}"
    "{% if message.role == 'user' %}<|start_header_id|>user<|end_header_id|>\n\n"
    "{% if tools and loop.first %}Given the following functions, please respond with a JSON for a "
    "function call with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}. Do not use variables.\n\n"
    "{% for tool in tools %}{{ tool | tojson }}\n\n{% endfor %}{% endif %}"
    "{{ message.content }}<|eot_id|>"
    "{% elif message.role == 'assistant' and message.tool_calls %}"
    "{% if message.tool_calls | length != 1 %}"
    "{{ raise_exception('This model only supports single tool-calls at once!') }}{% endif %}"
    "{% set call = message.tool_calls[0].function %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{{ '{\"name\": \"' + call.name + '\", \"parameters\": ' + call.arguments | tojson + '}' }}<|eot_id|>"
    "{% elif message.role == 'assistant' %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ message.content }}<|eot_id|>"
    "{% elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n"
    "{{ message.content }}<|eot_id|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
"""Llama 3.1-3.3 with custom tools: the schemas in the first user turn, a call as
``{"name": ..., "parameters": {...}}`` (one per turn, as Meta's template allows), results in an
``ipython`` turn. Its tokenizer has ``<|eom_id|>`` as Meta's does: the end of a turn that called a
built-in tool (``<|python_tag|>``), which generation stops at as it does at ``<|eot_id|>``."""

LLAMA31 = TemplateFamily(
    model_type="llama",
    template=LLAMA31_TEMPLATE,
    special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
    eos_token="<|eot_id|>",
)

QWEN25_TEMPLATE = (
    "{% if messages and messages[0].role == 'system' %}"
    "{% set system = messages[0].content %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = 'You are a helpful assistant.' %}{% set loop_messages = messages %}{% endif %}"
    "<|im_start|>system\n{{ system }}"
    "{% if tools %}{{ '\\n' }}\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>{% endif %}<|im_end|>\n"
    "{% for message in loop_messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{% if message.content %}{{ '\\n' + message.content }}{% endif %}"
    "{% for call in message.tool_calls %}"
    "{% set arguments = call.function.arguments %}"
    "{% if arguments is not string %}{% set arguments = arguments | tojson %}{% endif %}"
    "{{ '\\n' }}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ arguments }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or loop_messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ message.content }}\n</tool_response>"
    "{% if loop.last or loop_messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen 2.5 (Hermes calls): the schemas in the system turn, each call ``<tool_call>`` NL JSON NL
``</tool_call>``, consecutive results in one user turn of ``<tool_response>`` blocks. HF renders
templates with ``trim_blocks`` (a newline right after a tag is dropped), so those are expressions."""

QWEN25 = TemplateFamily(
    model_type="qwen2",
    template=QWEN25_TEMPLATE,
    special_tokens=(),
    added_tokens=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
)

FAMILIES = {"mistral": MISTRAL, "llama3": LLAMA31, "qwen": QWEN25}


def tokenizer_with_template(source: Path, out: Path, family: TemplateFamily) -> Path:
    """``source``'s tokenizer, with ``family``'s chat template and special tokens, saved to ``out``
    (a tokenizer folder: build a base on it with
    :func:`lorayard.testing.random_base.build_random_architecture`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens(list(family.special_tokens), special_tokens=True)
    tokenizer.add_tokens(list(family.added_tokens), special_tokens=False)
    if family.eos_token is not None:
        tokenizer.eos_token = family.eos_token
    tokenizer.chat_template = family.template
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return out


def build_tool_family_base(family: str, like: Path, out: Path) -> Path:
    """A tiny random base of ``family`` (a :data:`FAMILIES` key) with ``like``'s vocabulary plus the
    family's special tokens and its chat template."""
    from lorayard.testing.random_base import build_random_architecture

    spec = FAMILIES[family]
    tokenizer = tokenizer_with_template(like, out.parent / f"{out.name}-tokenizer", spec)
    return build_random_architecture(spec.model_type, tokenizer, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument(
        "--like", type=Path, default=None, help="tokenizer source (default: the default base)"
    )
    args = parser.parse_args()
    if args.like is None:
        from lorayard.base_model import resolve_base_model

        args.like = resolve_base_model().path
    print(build_tool_family_base(args.family, args.like, args.out))


if __name__ == "__main__":
    main()
