"""HTTP routes: thin. Parse -> pick adapter -> render prompt -> Generation -> OpenAI response/SSE."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lorayard.chat_format import ChatFormatError, Message, encode_text, render_prompt
from lorayard.volume import AdapterNotFound, InvalidAdapterName
from server.adapters.registry import version_label
from server.api.errors import APIError, NotReady
from server.api.generation import ChoiceDelta, Generation, TokenLogprob, sampling_params
from server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    SamplingFields,
    UnloadLoraRequest,
)
from server.runtime import ReadyRuntime, Runtime, require_api_key

router = APIRouter()


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_ready_runtime(request: Request) -> ReadyRuntime:
    runtime = get_runtime(request)
    if runtime.draining:
        raise APIError(503, "the server is shutting down", code="draining")
    if not runtime.ready:
        raise NotReady(runtime.load_error or "the server is loading the base model")
    return cast(ReadyRuntime, runtime)  # ready: tokenizer, engine and registry are set


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ReadyDep = Annotated[ReadyRuntime, Depends(get_ready_runtime)]
Authorized = [Depends(require_api_key)]


# -- health --------------------------------------------------------------------------------------
@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready", dependencies=Authorized)
async def ready(runtime: RuntimeDep) -> JSONResponse:
    """Readiness: 200 once the base model is loaded and the engine runs; 503 while loading or draining."""
    if runtime.ready and not runtime.draining:
        return JSONResponse({"status": "ready", "model": runtime.settings.base_model})
    state = "draining" if runtime.draining else "failed" if runtime.load_error else "loading"
    return JSONResponse({"status": state, "error": runtime.load_error}, status_code=503)


@router.get("/metrics")
async def metrics(runtime: RuntimeDep, request: Request) -> Response:
    if not runtime.settings.metrics_public:
        require_api_key(request)
    return PlainTextResponse(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- models and adapters -------------------------------------------------------------------------
@router.get("/v1/models", dependencies=Authorized)
async def list_models(runtime: ReadyDep) -> dict[str, Any]:
    base_id = runtime.settings.base_model
    created = int(runtime.started_at)
    data: list[dict[str, Any]] = [
        {
            "id": base_id,
            "object": "model",
            "created": created,
            "owned_by": "lorayard",
            "root": base_id,
            "parent": None,
        }
    ]
    for status in runtime.registry.list_models():
        data.append(
            {
                "id": status.name,
                "object": "model",
                "created": created,
                "owned_by": "lorayard",
                "root": base_id,
                "parent": base_id,
                "versions": [f"v{v}" for v in status.versions],
                "latest": None if status.latest is None else f"v{status.latest}",
                "plain_peft": status.plain,
                "loaded": status.loaded,
                "load_error": status.load_error,
            }
        )
    return {"object": "list", "data": data}


@router.post("/v1/load_lora_adapter", dependencies=Authorized)
async def load_lora_adapter(body: LoadLoraRequest, runtime: ReadyDep) -> dict[str, Any]:
    status = await runtime.registry.load(body.lora_name, body.lora_path)
    return {"status": "loaded", "lora_name": status.name, "latest": status.latest}


@router.post("/v1/unload_lora_adapter", dependencies=Authorized)
async def unload_lora_adapter(body: UnloadLoraRequest, runtime: ReadyDep) -> dict[str, Any]:
    await runtime.registry.unload(body.lora_name)
    return {"status": "unloaded", "lora_name": body.lora_name}


# -- generation ----------------------------------------------------------------------------------
def _adapter_ref(body: SamplingFields, runtime: ReadyRuntime) -> str | None:
    """`adapter` wins; else `model` names an adapter (vLLM/LoRAX style) or the base."""
    if body.adapter:
        return body.adapter
    if body.model is None or body.model == runtime.settings.base_model:
        return None
    if runtime.registry.known(body.model.partition("@")[0]):
        return body.model
    raise APIError(
        404,
        f"model {body.model!r} is neither the base model nor an adapter on the volume",
        param="model",
        code="model_not_found",
    )


async def _chat_prompt(
    runtime: ReadyRuntime, ref: str | None, messages: list[Message]
) -> tuple[list[int], str | None]:
    """Prompt ids for a chat request, rendered with the prompt template the adapter's manifest records
    (an adapter trained on a base without a chat template) or the base's own; and the ref pinned to
    the version whose template was used, so the request runs on that very version."""
    template = None
    if ref is not None:
        try:
            adapter = await asyncio.to_thread(runtime.registry.volume.resolve, ref)
            manifest = await asyncio.to_thread(adapter.manifest)
        except (AdapterNotFound, InvalidAdapterName, OSError, ValueError):
            pass  # acquiring the ref reports it properly
        else:
            template = manifest.prompt_template if manifest is not None else None
            ref = adapter.key
    try:
        return render_prompt(runtime.tokenizer, messages, template), ref
    except ChatFormatError as exc:
        raise APIError(400, str(exc), param="messages", code="invalid_value") from exc


async def _start(
    runtime: ReadyRuntime,
    request: Request,
    body: SamplingFields,
    prompt_ids: list[int],
    max_tokens: int | None,
    logprobs: int | None,
    ref: str | None,
) -> tuple[Generation, AsyncIterator[ChoiceDelta], ChoiceDelta | None]:
    settings = runtime.settings
    if body.n > settings.max_n:
        raise APIError(400, f"n: at most {settings.max_n}", param="n", code="invalid_value")
    params = sampling_params(body, max_tokens, logprobs, settings.max_tokens_limit)
    if len(prompt_ids) + params.max_tokens > runtime.engine.max_model_len and max_tokens is None:
        # No explicit max_tokens: fill the context window rather than refuse.
        from dataclasses import replace

        params = replace(params, max_tokens=max(1, runtime.engine.max_model_len - len(prompt_ids)))
    lease = None
    if ref is not None:
        try:
            lease = await runtime.registry.acquire(ref, body.user)
        except AdapterNotFound as exc:
            raise APIError(
                404, str(exc), param="adapter" if body.adapter else "model", code="adapter_not_found"
            ) from exc
    generation = Generation(
        engine=runtime.engine,
        registry=runtime.registry,
        tokenizer=runtime.tokenizer,
        metrics=runtime.metrics,
        prompt_ids=prompt_ids,
        params=params,
        n=body.n,
        stops=body.stop_strings(),
        lease=lease,
    )
    request.state.adapter = generation.adapter_label
    request.state.usage = generation.usage
    deltas = generation.deltas()
    try:
        # Pull the first delta now so engine refusals (queue full, context length) become a proper
        # HTTP error instead of a broken stream.
        first = await deltas.__anext__()
    except StopAsyncIteration:
        first = None
    return generation, deltas, first


async def _collect(
    deltas: AsyncIterator[ChoiceDelta], first: ChoiceDelta | None, request: Request
) -> list[ChoiceDelta]:
    """All deltas of a non-streamed request; a client that disconnects cancels the generation."""
    items = [] if first is None else [first]

    async def consume() -> None:
        async for item in deltas:
            items.append(item)

    task = asyncio.create_task(consume())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            # an async generator (Generation.deltas), typed as the AsyncIterator it is used as
            await deltas.aclose()  # type: ignore[attr-defined]
            raise asyncio.CancelledError
    task.result()
    return items


def _merge(items: list[ChoiceDelta], n: int) -> list[tuple[str, str, list[TokenLogprob]]]:
    texts = [""] * n
    reasons = ["stop"] * n
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    for item in items:
        texts[item.index] += item.text
        logprobs[item.index] += item.logprobs
        if item.finish_reason is not None:
            reasons[item.index] = item.finish_reason
    return list(zip(texts, reasons, logprobs, strict=True))


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.token.encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in e.top],
            }
            for e in entries
        ]
    }


def _completion_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": [],
    }


VERSION_HEADER = "x-lorayard-adapter-version"
"""Which version of the adapter served the request (``vN``, or ``plain`` for a plain PEFT folder)."""


def _served(
    generation: Generation, body: SamplingFields, runtime: ReadyRuntime
) -> tuple[str, dict[str, str]]:
    """The response's ``model`` and headers: ``name@vN`` and the version header when an adapter served."""
    lease = generation.lease
    if lease is None:
        return body.model or runtime.settings.base_model, {}
    return lease.key, {VERSION_HEADER: version_label(lease.version)}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _stream(
    kind: str,
    generation: Generation,
    deltas: AsyncIterator[ChoiceDelta],
    first: ChoiceDelta | None,
    model: str,
    include_usage: bool,
    want_logprobs: bool,
    headers: dict[str, str],
) -> StreamingResponse:
    response_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _sse(
            {
                "id": response_id,
                "object": obj,
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
        )

    def choice(item: ChoiceDelta) -> dict[str, Any]:
        if kind == "chat":
            lp = _chat_logprobs(item.logprobs) if want_logprobs else None
            return {
                "index": item.index,
                "delta": {"content": item.text} if item.text else {},
                "logprobs": lp,
                "finish_reason": item.finish_reason,
            }
        lp = _completion_logprobs(item.logprobs) if want_logprobs else None
        return {"index": item.index, "text": item.text, "logprobs": lp, "finish_reason": item.finish_reason}

    async def body() -> AsyncIterator[str]:
        try:
            if kind == "chat":
                roles = [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    for i in range(generation.n)
                ]
                yield chunk(roles)
            if first is not None:
                yield chunk([choice(first)])
            async for item in deltas:
                yield chunk([choice(item)])
            if include_usage:
                yield chunk([], usage=generation.usage.as_dict())
            yield "data: [DONE]\n\n"
        finally:
            # an async generator (Generation.deltas), typed as the AsyncIterator it is used as
            await deltas.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers}
    )


@router.post("/v1/chat/completions", dependencies=Authorized)
async def chat_completions(body: ChatCompletionRequest, request: Request, runtime: ReadyDep) -> Response:
    messages: list[Message] = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids, ref = await _chat_prompt(runtime, _adapter_ref(body, runtime), messages)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    generation, deltas, first = await _start(runtime, request, body, prompt_ids, max_tokens, logprobs, ref)
    model, headers = _served(generation, body, runtime)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream("chat", generation, deltas, first, model, include_usage, logprobs is not None, headers)
    items = await _collect(deltas, first, request)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "logprobs": _chat_logprobs(lps) if logprobs is not None else None,
            "finish_reason": reason,
        }
        for i, (text, reason, lps) in enumerate(_merge(items, body.n))
    ]
    return JSONResponse(
        {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": generation.usage.as_dict(),
        },
        headers=headers,
    )


@router.post("/v1/completions", dependencies=Authorized)
async def completions(body: CompletionRequest, request: Request, runtime: ReadyDep) -> Response:
    prompt = body.prompt
    if isinstance(prompt, list):
        vocab = len(runtime.tokenizer)
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise APIError(
                400, f"prompt: token ids must be in [0, {vocab})", param="prompt", code="invalid_value"
            )
        prompt_ids = [int(t) for t in prompt]
    else:
        prompt_ids = encode_text(runtime.tokenizer, prompt)
    generation, deltas, first = await _start(
        runtime, request, body, prompt_ids, body.max_tokens, body.logprobs, _adapter_ref(body, runtime)
    )
    model, headers = _served(generation, body, runtime)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(
            "completion", generation, deltas, first, model, include_usage, body.logprobs is not None, headers
        )
    items = await _collect(deltas, first, request)
    echo = prompt if (body.echo and isinstance(prompt, str)) else ""
    choices = [
        {
            "index": i,
            "text": echo + text,
            "logprobs": _completion_logprobs(lps) if body.logprobs is not None else None,
            "finish_reason": reason,
        }
        for i, (text, reason, lps) in enumerate(_merge(items, body.n))
    ]
    return JSONResponse(
        {
            "id": "cmpl-" + uuid.uuid4().hex,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": generation.usage.as_dict(),
        },
        headers=headers,
    )
