"""The serving layer: a request body -> a validated :class:`EngineJob`, the one place for every check.

Routes call :func:`completion_job` / :func:`chat_job` and hand the job to
:class:`lorayard.server.api.generation.Generation`. Everything a request can carry that the engine would index
with (prompt ids, ``stop_token_ids``, ``logit_bias`` keys) is checked against the vocabulary here, every
limit against the server's settings, every schema compiled as JSON Schema; a failure is a 400 naming
the field. What we cannot do exactly is refused by name (:data:`REFUSED_FIELDS`), never ignored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import jsonschema

from lorayard.chat_format import (
    NO_TOOLS,
    ChatFormatError,
    Message,
    ToolCallEntry,
    ToolContext,
    encode_text,
    render_prompt,
)
from lorayard.server.api.errors import APIError
from lorayard.server.api.images import ImageRef, request_images, with_image_pads
from lorayard.server.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    DetokenizeRequest,
    DetokenizeResponse,
    ResponseFormat,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    Tool,
)
from lorayard.server.api.tool_calls import ToolCalling, ToolChoice, tool_calling, tool_grammar
from lorayard.server.engine.request_rules import (
    check_context,
    check_min_tokens,
    check_token_ids,
    default_max_tokens,
)
from lorayard.server.engine.types import (
    GuidedDecoding,
    ImageInputs,
    InvalidRequest,
    PromptTooLong,
    SamplingParams,
)
from lorayard.tool_format import (
    DEFAULT_TOOL_FORMAT,
    ToolFormat,
    ToolFormatConflict,
    UnknownToolFormat,
    tool_format_for_template,
    version_tool_format,
)
from lorayard.vision import IMAGE_PAD, IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from lorayard.server.adapters.registry import AdapterLease
    from lorayard.server.runtime import ReadyRuntime

JSON_OBJECT_SCHEMA = '{"type": "object"}'
"""``response_format: json_object`` as the schema of a text answer beside tool calls."""

LOGIT_BIAS_LIMIT = 100.0
"""OpenAI's bound on a logit_bias value (either sign)."""
MIN_TEMPERATURE = 1e-5
"""The smallest temperature above 0 (vLLM's sampling epsilon): logits divided by less overflow
float32 to inf; send 0 for greedy decoding."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""torch's generator seeds: the request's seed and seed + n - 1 (its choices' seeds) must lie inside."""
MAX_SCHEMA_DEPTH = 64
"""JSON nesting levels (objects and arrays) a schema may have: deeper ones exhaust the recursion of
the schema checks long before any real schema (a property path of ~30 objects) needs them."""

REFUSED_FIELDS: dict[str, str] = {
    "functions": "the legacy `functions` field is not supported: send `tools`",
    "function_call": "the legacy `function_call` field is not supported: send `tool_choice`",
    "suffix": "`suffix` (insertion) is not supported: send the text before the gap as `prompt`",
    "guided_json": "vLLM's `guided_json` is not supported: send `response_format` with a json_schema",
    "guided_regex": "`guided_regex` is not supported: only JSON (response_format) can be enforced",
    "guided_choice": "`guided_choice` is not supported: send `response_format` with an enum json_schema",
    "guided_grammar": "`guided_grammar` is not supported: only JSON (response_format) can be enforced",
    "audio": "audio output is not supported: the served models write text; send the request without it",
    "prediction": "predicted outputs are not supported: send the request without it (a prediction only"
    " speeds an answer up, never changes it)",
    "min_p": "`min_p` is not supported: use top_p or top_k",
    "typical_p": "`typical_p` is not supported: use top_p or top_k",
    "use_beam_search": "beam search is not supported: send `n` with `logprobs` and rank the choices",
    "length_penalty": "`length_penalty` (beam search) is not supported: send `n` with `logprobs` and"
    " rank the choices",
    "allowed_token_ids": "`allowed_token_ids` is not supported: use logit_bias (+100) or response_format",
    "bad_words": "`bad_words` is not supported: use logit_bias (-100) on their token ids",
    "include_stop_str_in_output": "`include_stop_str_in_output` is not supported: stop strings are cut;"
    " a choice that ended on one has finish_reason `stop`: append it yourself",
    "skip_special_tokens": "`skip_special_tokens: false` is not supported: special tokens are skipped"
    " from the text; `logprobs` lists every generated token, special ones included",
    "truncate_prompt_tokens": "prompt truncation is not supported: send a shorter prompt",
    "chat_template": "a per-request chat template is not supported: the base's template is used; send"
    " a prompt rendered your way to /v1/completions",
    "continue_final_message": "`continue_final_message` is not supported: use /v1/completions",
    # Declared by /v1/completions, so only ever an unknown field on chat:
    "echo": "`echo` is only supported on /v1/completions",
    "prompt_logprobs": "`prompt_logprobs` is only supported on /v1/completions",
}
"""Fields a client may send that we cannot honour: refused with a 400 saying what to send instead,
unless they carry their no-op value (:data:`_NO_OP_VALUES`). Other unknown fields (``user``,
``metadata``, ...) change nothing about the output and are ignored."""

_NO_OP_VALUES: dict[str, object] = {
    "min_p": 0.0,
    "typical_p": 1.0,
    "use_beam_search": False,
    "length_penalty": 1.0,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "continue_final_message": False,
    "echo": False,
}


@dataclass(frozen=True)
class EngineJob:
    """A validated request, ready for the engine: everything the routes and generation need."""

    kind: Literal["chat", "completion"]
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    stops: list[str]
    adapter: str | None
    """Adapter reference to lease (``name`` or ``name@vN``); None: the base model."""
    adapter_param: str
    """The field the adapter came from ("adapter" or "model"), for a 404's ``param``."""
    model: str
    """The model name echoed in responses."""
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    """Return the sampled tokens' logprobs."""
    echo: str | None = None
    """Completions with ``echo``: the prompt text prepended to each choice."""
    vllm_prompt_logprobs: bool = False
    """Return vLLM's ``prompt_logprobs`` field (by token id) on each choice."""
    tools: ToolCalling | None = None
    answer_schema: str | None = None
    """Chat jobs with tools: the JSON Schema a text answer beside the calls must satisfy
    (``response_format``), kept to build the calls' grammar again in an adapter version's format."""
    guided_param: str = "response_format"
    """The field the grammar came from ("response_format" or "tools"), for a 400's ``param``."""
    user: str | None = None
    """OpenAI's end-user id: a canary split routes it to the same version every time."""
    requested_max_tokens: int | None = None
    """Chat jobs: the max_tokens the body asked for (None: fill the window), for a prompt rendered
    after the lease, whose length decides the default."""
    tool_context: ToolContext = NO_TOOLS
    """Chat jobs: the tools the prompt shows (and their format)."""
    messages: tuple[Message, ...] | None = None
    """Chat jobs: the conversation, rendered again with the leased version's prompt template when it
    has one (an adapter trained on a base without a chat template); ``prompt_ids`` is then empty
    until the lease says which template applies."""
    images: ImageInputs | None = None
    """Chat jobs on a vision-language base: the images whose pad tokens ``prompt_ids`` holds."""

    @property
    def uses_tool_format(self) -> bool:
        """Whether a tool-call format shapes this job: calls to parse, tools shown, or calls replayed."""
        return _uses_tool_format(self.tools, self.tool_context, self.messages or ())


def _uses_tool_format(tools: ToolCalling | None, context: ToolContext, messages: Sequence[Message]) -> bool:
    return tools is not None or bool(context.tools) or any(m.get("tool_calls") for m in messages)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def _refuse_unsupported(body: SamplingFields) -> None:
    for name in sorted(body.extra_fields()):
        value = (body.model_extra or {})[name]
        if name in REFUSED_FIELDS and value is not None and value != _NO_OP_VALUES.get(name, ...):
            raise APIError(400, REFUSED_FIELDS[name], param=name, code="unsupported_field")
    best_of = (body.model_extra or {}).get("best_of")
    if best_of not in (None, 1, body.n):
        raise APIError(
            400,
            "best_of: only best_of == n is supported: send `n` with `logprobs` and rank the choices",
            param="best_of",
            code="unsupported",
        )


def _token_ids(param: str, ids: list[int], vocab: int) -> list[int]:
    try:
        check_token_ids(param, ids, vocab)
    except InvalidRequest as exc:
        raise APIError(400, str(exc), param=param, code="invalid_value") from None
    return ids


def _logit_bias(raw: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    if not raw:
        return ()
    pairs = []
    for key, bias in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise _bad("logit_bias", f"key {key!r} is not a token id") from None
        _token_ids("logit_bias", [token], vocab)
        if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
            raise _bad("logit_bias", f"bias {bias} for token {token} is outside [-100, 100]")
        pairs.append((token, float(bias)))
    return tuple(sorted(pairs))


def _depth(value: Any) -> int:
    """JSON nesting levels of ``value`` (a scalar: 0), without recursion (a deep value is the input
    this guards against)."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        node, level = pending.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, level + 1)
            pending.extend((child, level + 1) for child in children)
    return deepest


def _checked_schema(param: str, schema: Any, max_bytes: int) -> str:
    """The schema as compact JSON, once its size, depth and meta-schema are checked."""
    if not isinstance(schema, dict):
        raise _bad(param, "must be a JSON Schema object")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise _bad(param, f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
    text = json.dumps(schema, separators=(",", ":"))
    if len(text.encode()) > max_bytes:
        raise APIError(
            400,
            f"{param}: {len(text.encode())} bytes as compact JSON, over the server limit of {max_bytes}"
            " (--max-schema-bytes)",
            param=param,
            code="schema_too_large",
        )
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise _bad(param, f"not a valid JSON Schema: {exc.message}") from None
    return text


def _guided_from_format(fmt: ResponseFormat | None, max_bytes: int) -> GuidedDecoding | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GuidedDecoding("json_object")
    if fmt.json_schema is None:
        raise _bad("response_format.json_schema", "required when type is json_schema")
    schema = _checked_schema("response_format.json_schema.schema", fmt.json_schema.json_schema, max_bytes)
    return GuidedDecoding("json_schema", schema)


def _tool_specs(tools: list[Tool] | None) -> tuple[dict[str, Any], ...]:
    """``tool_choice: "none"``: the tools are still shown to the model, as OpenAI does; none is called."""
    return tuple(t.model_dump(mode="json", exclude_none=True, by_alias=True) for t in tools or [])


def _adapter_ref(adapter: str | None, model: str | None, runtime: ReadyRuntime) -> tuple[str | None, str]:
    """`adapter` wins; else `model` names an adapter (vLLM/LoRAX style) or the base."""
    if adapter:
        return adapter, "adapter"
    if model is None or model == runtime.settings.base_model:
        return None, "model"
    if runtime.registry.known(model.partition("@")[0]):
        return model, "model"
    raise APIError(
        404,
        f"model {model!r} is neither the base model nor an adapter on the volume",
        param="model",
        code="model_not_found",
    )


def _max_tokens(
    runtime: ReadyRuntime, requested: int | None, prompt_len: int, prompt_param: str, *, scoring: bool
) -> int:
    """The request's max_tokens, checked against the server limit and the context window."""
    limit = runtime.settings.max_tokens_limit
    window = runtime.engine.max_model_len
    if requested == 0 and not scoring:
        raise _bad("max_tokens", "0 is only allowed with echo or prompt_logprobs (scoring the prompt)")
    if requested is not None and requested > limit:
        raise _bad("max_tokens", f"at most {limit} (server limit)")
    if requested is None:
        requested = default_max_tokens(prompt_len, limit, window)
    try:
        check_context(prompt_len, requested, window)
    except PromptTooLong as exc:
        raise APIError(
            400, f"{prompt_param}: {exc}", param=prompt_param, code="context_length_exceeded"
        ) from None
    return requested


def _sampling_params(
    body: SamplingFields,
    runtime: ReadyRuntime,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    guided: GuidedDecoding | None = None,
) -> SamplingParams:
    vocab = runtime.engine.vocab_size
    if body.n > runtime.settings.max_n:
        raise _bad("n", f"at most {runtime.settings.max_n}")
    try:
        check_min_tokens(guided, body.min_tokens)
    except InvalidRequest as exc:
        raise APIError(400, str(exc), param="min_tokens", code="invalid_value") from None
    if 0 < body.temperature < MIN_TEMPERATURE:
        raise _bad(
            "temperature", f"between 0 and {MIN_TEMPERATURE:g} overflows the logits: send 0 for greedy"
        )
    _check_seed(body.seed, body.n)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        stop_token_ids=frozenset(_token_ids("stop_token_ids", body.stop_token_ids or [], vocab)),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logprobs=logprobs,
        logit_bias=_logit_bias(body.logit_bias, vocab),
        prompt_logprobs=prompt_logprobs,
        guided=guided,
    )


def _check_seed(seed: int | None, n: int) -> None:
    low, high = SEED_RANGE
    if seed is not None and not (low <= seed and seed + n - 1 <= high):
        what = "seed" if n == 1 else f"seed + n - 1 (the last choice's seed, {seed + n - 1})"
        raise _bad("seed", f"{what} is outside [-2^63, 2^64 - 1]")


def _job(
    kind: Literal["chat", "completion"],
    body: SamplingFields,
    runtime: ReadyRuntime,
    *,
    prompt_ids: list[int],
    params: SamplingParams,
    ref: tuple[str | None, str],
    **specific: Any,
) -> EngineJob:
    """The job with the fields both endpoints fill alike; ``ref``: :func:`_adapter_ref`'s answer;
    ``specific``: the endpoint's own fields."""
    adapter, adapter_param = ref
    return EngineJob(
        kind=kind,
        prompt_ids=prompt_ids,
        params=params,
        n=body.n,
        stops=body.stop_strings(),
        adapter=adapter,
        adapter_param=adapter_param,
        model=body.model or runtime.settings.base_model,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        user=body.user,
        **specific,
    )


def completion_job(body: CompletionRequest, runtime: ReadyRuntime) -> EngineJob:
    """/v1/completions body -> job. ``echo`` + ``logprobs`` also scores the prompt tokens."""
    _refuse_unsupported(body)
    prompt = body.prompt
    if isinstance(prompt, list):
        # the field's validator leaves one prompt: a list here is token ids (checked just below)
        prompt_ids = _token_ids("prompt", list(prompt), runtime.engine.vocab_size)  # type: ignore[arg-type]
        prompt_text = str(runtime.tokenizer.decode(prompt_ids, skip_special_tokens=False))
    else:
        prompt_ids = encode_text(runtime.tokenizer, prompt)
        prompt_text = prompt
        if not prompt_ids:
            raise _bad("prompt", "encodes to no tokens")
    scoring = body.echo or body.prompt_logprobs is not None
    max_tokens = _max_tokens(runtime, body.max_tokens, len(prompt_ids), "prompt", scoring=scoring)
    # OpenAI's echo + logprobs scores the prompt too; max_tokens 0 needs the prompt pass regardless.
    prompt_logprobs = body.prompt_logprobs
    if body.echo and (body.logprobs is not None or max_tokens == 0):
        prompt_logprobs = max(prompt_logprobs or 0, body.logprobs or 0)
    ref = _adapter_ref(body.adapter, body.model, runtime)
    params = _sampling_params(
        body,
        runtime,
        max_tokens=max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=prompt_logprobs,
        guided=_guided_from_format(body.response_format, runtime.settings.max_schema_bytes),
    )
    return _job(
        "completion",
        body,
        runtime,
        prompt_ids=prompt_ids,
        params=params,
        ref=ref,
        logprobs=body.logprobs is not None,
        echo=prompt_text if body.echo else None,
        vllm_prompt_logprobs=body.prompt_logprobs is not None,
    )


def _content_text(
    content: str | list[ContentPart] | None, param: str, images: list[ImageRef] | None = None
) -> str:
    """A message's content as text: a string, or text parts joined; with ``images`` (a vision-language
    base) each image part is its placeholder in the text and its URL is appended to ``images``; other
    parts are refused by name."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type == "image_url" and images is not None:
            if part.image_url is None:
                raise _bad(f"{param}.{j}.image_url", "required in an image_url part")
            images.append(ImageRef(part.image_url.url, f"{param}.{j}.image_url.url"))
            texts.append(IMAGE_PLACEHOLDER)
            continue
        if part.type != "text" or part.text is None:
            what = "image" if "image" in part.type else repr(part.type)
            raise APIError(
                400,
                f"{param}.{j}.type: {what} content parts are not supported (the base model reads text):"
                " send text parts or a string",
                param=f"{param}.{j}.type",
                code="unsupported_content",
            )
        texts.append(part.text)
    return "".join(texts)


def _replayed_calls(message: ChatMessage, i: int) -> list[ToolCallEntry]:
    if message.role != "assistant":
        raise _bad(f"messages.{i}.tool_calls", "only assistant messages carry tool calls")
    calls: list[ToolCallEntry] = []
    for call in message.tool_calls or []:
        arguments = call.function.arguments
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        calls.append(
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": text}}
        )
    return calls


def conversation(messages: list[ChatMessage], images: list[ImageRef] | None = None) -> list[Message]:
    """OpenAI's messages -> the conversation :mod:`lorayard.chat_format` renders: ``developer`` is a
    system turn, content parts are text (and, given ``images`` to collect them in, image parts are
    image placeholders), an assistant turn may be calls alone, a tool turn answers a call by
    ``tool_call_id``. A message we cannot render is a 400 naming its field."""
    out: list[Message] = []
    for i, message in enumerate(messages):
        if message.content is None and message.role != "assistant":
            raise _bad(f"messages.{i}.content", f"required in a {message.role} message")
        role = "system" if message.role == "developer" else message.role
        content = _content_text(message.content, f"messages.{i}.content", images)
        entry: Message = {"role": role, "content": content}
        if message.tool_calls:
            entry["tool_calls"] = _replayed_calls(message, i)
        if message.role == "tool":
            if not message.tool_call_id:
                raise _bad(f"messages.{i}.tool_call_id", "required in a tool message")
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def tool_format(runtime: ReadyRuntime, template: str | None = None) -> ToolFormat:
    """The call format of the template a request renders with (``template``, else the base's)."""
    try:
        return tool_format_for_template(
            template or runtime.tokenizer.chat_template, runtime.settings.tool_call_format
        )
    except UnknownToolFormat as exc:
        raise _bad("tools", str(exc)) from None


def _shown_format(runtime: ReadyRuntime) -> ToolFormat:
    """The format replayed calls render in when no call can be made (``tool_choice: "none"``, or no
    tools): only a template without tools support renders them (in the default format, or the
    flag's); a native template writes them itself, so a format it has that we cannot parse is moot."""
    try:
        return tool_format_for_template(runtime.tokenizer.chat_template, runtime.settings.tool_call_format)
    except UnknownToolFormat:
        return DEFAULT_TOOL_FORMAT


def request_tools(
    runtime: ReadyRuntime, tools: list[Tool] | None, choice: ToolChoice, parallel: bool | None
) -> ToolCalling | None:
    """The tools a request may call, in the base's call format; each schema checked as
    ``response_format``'s is (size, depth, meta-schema), and all of them together bounded as one, since
    the grammar of the calls holds every one."""
    if not tools:  # the format is only looked up when there are tools to write (a 400 if unknown)
        return tool_calling(None, choice, parallel, tool_format_for_template(None))
    _check_tool_schemas(tools, runtime.settings.max_schema_bytes)
    return tool_calling(tools, choice, parallel, tool_format(runtime))


def _check_tool_schemas(tools: list[Tool], max_bytes: int) -> None:
    for i, tool in enumerate(tools):
        _checked_schema(f"tools.{i}.function.parameters", tool.function.parameters, max_bytes)
    _checked_schema("tools", {"anyOf": [t.function.parameters for t in tools]}, max_bytes)


def chat_prompt_ids(
    runtime: ReadyRuntime, messages: list[Message], template: str | None = None, tools: ToolContext = NO_TOOLS
) -> list[int]:
    """The prompt for ``messages`` (with ``template``, else the base's chat template); 400 if neither."""
    try:
        return render_prompt(runtime.tokenizer, messages, template, tools)
    except ChatFormatError as exc:
        raise _bad("messages", str(exc)) from None


def chat_job(body: ChatCompletionRequest, runtime: ReadyRuntime) -> EngineJob:
    """/v1/chat/completions body -> job, with response_format or forced tool calls as a grammar."""
    _refuse_unsupported(body)
    image_refs: list[ImageRef] | None = [] if runtime.image_processor is not None else None
    messages = conversation(body.messages, image_refs)
    ref = _adapter_ref(body.adapter, body.model, runtime)
    adapter = ref[0]
    # A base without a chat template: only an adapter's own prompt template can render the chat,
    # known once its version is leased (canary routing picks it); Generation renders it then.
    deferred = adapter is not None and runtime.tokenizer.chat_template is None
    if deferred and image_refs:
        raise _bad("messages", "images need the base's chat template (this base has none)")
    tools = request_tools(runtime, body.tools, body.tool_choice, body.parallel_tool_calls)
    context = (
        tools.context if tools is not None else ToolContext(_tool_specs(body.tools), _shown_format(runtime))
    )
    prompt_ids = [] if deferred else chat_prompt_ids(runtime, messages, tools=context)
    images = None
    if image_refs:
        settings = runtime.settings
        images, counts = request_images(
            image_refs, runtime.image_processor, settings.image_limits(), settings.image_dir
        )
        pad_id = runtime.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        assert isinstance(pad_id, int)  # one token in, one id out
        prompt_ids = with_image_pads(prompt_ids, pad_id, counts)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = _max_tokens(runtime, requested, len(prompt_ids), "messages", scoring=False)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    guided = _guided_from_format(body.response_format, runtime.settings.max_schema_bytes)
    answer_schema = None
    if tools is not None:
        answer_schema = None if guided is None else guided.schema or JSON_OBJECT_SCHEMA
        guided = tool_grammar(tools, answer_schema)
    params = _sampling_params(body, runtime, max_tokens=max_tokens, logprobs=logprobs, guided=guided)
    return _job(
        "chat",
        body,
        runtime,
        prompt_ids=prompt_ids,
        params=params,
        ref=ref,
        logprobs=logprobs is not None,
        tools=tools,
        answer_schema=answer_schema,
        guided_param="response_format" if tools is None else "tools",
        messages=tuple(messages),
        tool_context=context,
        requested_max_tokens=requested,
        images=images,
    )


def job_for_version(runtime: ReadyRuntime, job: EngineJob, lease: AdapterLease) -> EngineJob:
    """The chat job as the leased adapter version serves it, exactly as its training examples were
    rendered: with its own prompt template (trained on a base without a chat template) and in the
    tool-call format it was trained in (its manifest's); the calls' grammar, their parser and the
    default max_tokens follow. Other jobs, and versions that change neither, are returned as they are."""
    if job.kind != "chat" or job.messages is None:
        return job
    fmt = _version_format(runtime, lease, job.tool_context.format, job.uses_tool_format, job.adapter_param)
    if lease.prompt_template is None and job.prompt_ids and fmt == job.tool_context.format:
        return job
    if job.images is not None:  # its pad tokens were expanded in the base template's rendering
        raise _bad(
            "messages",
            f"{lease.key} has its own prompt template or tool-call format: images are served with the "
            "base's chat template and tool-call format",
        )
    tools = None if job.tools is None else replace(job.tools, format=fmt)
    context = replace(job.tool_context, format=fmt)
    prompt_ids = chat_prompt_ids(runtime, list(job.messages), lease.prompt_template, context)
    # Only now is the prompt's length known: the default max_tokens and the window follow from it.
    max_tokens = _max_tokens(runtime, job.requested_max_tokens, len(prompt_ids), "messages", scoring=False)
    guided = job.params.guided if tools is None else tool_grammar(tools, job.answer_schema)
    params = replace(job.params, max_tokens=max_tokens, guided=guided)
    return replace(job, prompt_ids=prompt_ids, tools=tools, tool_context=context, params=params)


def _version_format(
    runtime: ReadyRuntime, lease: AdapterLease, base: ToolFormat, uses_format: bool, param: str
) -> ToolFormat:
    """:func:`version_tool_format` for a request a format shapes (``uses_format``: tools, or calls
    replayed), else ``base``; a conflict is a 400 naming the field that chose the adapter."""
    if not uses_format:
        return base
    try:
        return version_tool_format(lease.tool_format, runtime.settings.tool_call_format, base)
    except ToolFormatConflict as exc:
        raise APIError(
            400,
            f"{param}: adapter version {lease.key} cannot serve tool calls here: {exc}",
            param=param,
            code="tool_format_conflict",
        ) from None


def tokenize_adapter(body: TokenizeRequest, runtime: ReadyRuntime) -> tuple[str | None, str]:
    """The adapter whose chat rendering /tokenize must count (``messages`` with ``model`` naming one:
    its version may have its own prompt template or tool-call format); None for text prompts."""
    if body.messages is None:
        return None, "model"
    return _adapter_ref(None, body.model, runtime)


def tokenize_text(
    body: TokenizeRequest, runtime: ReadyRuntime, lease: AdapterLease | None = None
) -> TokenizeResponse:
    """vLLM's /tokenize: ``prompt`` (text) or ``messages`` (the chat template, as chat renders it: for
    the leased adapter version, as its chat requests render, so ``count`` is their prompt_tokens)."""
    tokenizer = runtime.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise _bad("prompt", "send exactly one of `prompt` and `messages`")
    if body.messages is not None:
        ids = _chat_tokens(body, body.messages, runtime, lease)
    elif body.add_special_tokens:
        ids = list(tokenizer(body.prompt, add_special_tokens=True)["input_ids"])
    else:
        ids = encode_text(tokenizer, body.prompt or "")
    strs = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)] if body.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=runtime.engine.max_model_len, tokens=ids, token_strs=strs
    )


def _chat_tokens(
    body: TokenizeRequest, messages: list[ChatMessage], runtime: ReadyRuntime, lease: AdapterLease | None
) -> list[int]:
    if not body.add_generation_prompt:
        raise _bad("add_generation_prompt", "only true is supported (the prompt chat serves)")
    tools = request_tools(runtime, body.tools, None, None)
    context = (
        tools.context if tools is not None else ToolContext(_tool_specs(body.tools), _shown_format(runtime))
    )
    turns = conversation(messages)
    if lease is None:
        return chat_prompt_ids(runtime, turns, tools=context)
    fmt = _version_format(runtime, lease, context.format, _uses_tool_format(tools, context, turns), "model")
    return chat_prompt_ids(runtime, turns, lease.prompt_template, replace(context, format=fmt))


def detokenize_ids(body: DetokenizeRequest, runtime: ReadyRuntime) -> DetokenizeResponse:
    ids = _token_ids("tokens", body.tokens, runtime.engine.vocab_size)
    return DetokenizeResponse(prompt=str(runtime.tokenizer.decode(ids)))
