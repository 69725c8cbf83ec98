"""HTTP routes: thin. Body -> serving (a validated EngineJob) -> Generation -> typed response or SSE."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lorayard.server.api.auth import caller_digest, require_api_key
from lorayard.server.api.errors import APIError, NotReady
from lorayard.server.api.generation import ChoiceDelta, Generation, adapter_lease
from lorayard.server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoraRequest,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoraRequest,
)
from lorayard.server.api.response_store import ResponseStore, StoredResponse
from lorayard.server.api.responses import ChatBuilder, CompletionBuilder
from lorayard.server.api.responses_events import ResponseAssembler, response_sse
from lorayard.server.api.responses_protocol import (
    InputItemList,
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
)
from lorayard.server.api.responses_serving import input_item_page, responses_input, responses_turn
from lorayard.server.api.serving import (
    EngineJob,
    chat_job,
    completion_job,
    detokenize_ids,
    tokenize_adapter,
    tokenize_text,
)
from lorayard.server.api.streaming import sse_stream
from lorayard.server.metrics import version_label
from lorayard.server.runtime import ReadyRuntime, Runtime

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
    runtime.check_engine()
    if runtime.ready and not runtime.draining:
        return JSONResponse({"status": "ready", "model": runtime.settings.base_model})
    state = "draining" if runtime.draining else "failed" if runtime.load_error else "loading"
    return JSONResponse({"status": state, "error": runtime.load_error}, status_code=503)


@router.get("/metrics")
async def metrics(runtime: RuntimeDep, request: Request) -> Response:
    if not runtime.settings.metrics_public:
        require_api_key(request)
    runtime.check_engine()  # a scrape notices a dead engine as a probe does
    return PlainTextResponse(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- models and adapters -------------------------------------------------------------------------
def _model_cards(runtime: ReadyRuntime) -> list[dict[str, Any]]:
    """The base, then every adapter on the volume, as OpenAI model objects (ours carry versions)."""
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
    return data


@router.get("/v1/models", dependencies=Authorized)
async def list_models(runtime: ReadyDep) -> dict[str, Any]:
    return {"object": "list", "data": _model_cards(runtime)}


@router.get("/v1/models/{model_id:path}", dependencies=Authorized)
async def retrieve_model(model_id: str, runtime: ReadyDep) -> dict[str, Any]:
    """One model: the base or an adapter (``name@vN`` answers its adapter's card, if that version exists)."""
    name, _, version = model_id.partition("@")
    for card in _model_cards(runtime):
        if card["id"] == name and (not version or version in card.get("versions", ())):
            return card
    raise APIError(
        404,
        f"model {model_id!r} is neither the base model nor an adapter on the volume",
        param="model",
        code="model_not_found",
    )


@router.post("/v1/load_lora_adapter", dependencies=Authorized)
async def load_lora_adapter(body: LoadLoraRequest, runtime: ReadyDep) -> dict[str, Any]:
    status = await runtime.registry.load(body.lora_name, body.lora_path)
    return {"status": "loaded", "lora_name": status.name, "latest": status.latest}


@router.post("/v1/unload_lora_adapter", dependencies=Authorized)
async def unload_lora_adapter(body: UnloadLoraRequest, runtime: ReadyDep) -> dict[str, Any]:
    await runtime.registry.unload(body.lora_name)
    return {"status": "unloaded", "lora_name": body.lora_name}


# -- generation ----------------------------------------------------------------------------------
async def _prepend(
    first: ChoiceDelta | None, deltas: AsyncGenerator[ChoiceDelta, None]
) -> AsyncIterator[ChoiceDelta]:
    try:
        if first is not None:
            yield first
        async for delta in deltas:
            yield delta
    finally:
        await deltas.aclose()


async def _collect(deltas: AsyncIterator[ChoiceDelta], request: Request) -> list[ChoiceDelta]:
    """All deltas of a non-streamed request; a client that disconnects cancels the generation."""
    items: list[ChoiceDelta] = []

    async def consume() -> None:
        async for item in deltas:
            items.append(item)

    task = asyncio.create_task(consume())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise asyncio.CancelledError
    task.result()
    return items


VERSION_HEADER = "x-lorayard-adapter-version"
"""Which version of the adapter served the request (``vN``, or ``plain`` for a plain PEFT folder)."""


def _served(generation: Generation) -> tuple[EngineJob, dict[str, str]]:
    """The job as responses echo it (``model`` is ``name@vN`` when an adapter version served) and the
    version header; known once the generation holds its lease."""
    lease = generation.lease
    if lease is None:
        return generation.job, {}
    return replace(generation.job, model=lease.key), {VERSION_HEADER: version_label(lease.version)}


async def _start(
    runtime: ReadyRuntime, request: Request, job: EngineJob
) -> tuple[Generation, AsyncIterator[ChoiceDelta]]:
    """The generation of ``job``, started: its first delta is pulled now so refusals (queue full,
    unknown adapter, context length) become a proper HTTP error instead of a broken stream."""
    generation = Generation(runtime, job)
    request.state.generation = generation  # the access log and request counter read it
    deltas = generation.deltas(request.is_disconnected)
    try:
        first: ChoiceDelta | None = await deltas.__anext__()
    except StopAsyncIteration:
        first = None
    return generation, _prepend(first, deltas)


async def _generate(
    runtime: ReadyRuntime,
    request: Request,
    job: EngineJob,
    builder_type: type[CompletionBuilder] | type[ChatBuilder],
) -> Response:
    generation, stream = await _start(runtime, request, job)
    served, headers = _served(generation)
    builder = builder_type(served, runtime.tokenizer)
    if job.stream:
        errors: list[int] = []
        request.state.stream_errors = errors
        chunks = sse_stream(builder.chunks(stream, generation.usage), errors)
        return StreamingResponse(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers}
        )
    items = await _collect(stream, request)
    return JSONResponse(builder.response(items, generation.usage).model_dump(mode="json"), headers=headers)


@router.post("/v1/chat/completions", dependencies=Authorized)
async def chat_completions(body: ChatCompletionRequest, request: Request, runtime: ReadyDep) -> Response:
    if runtime.image_processor is None:
        job = chat_job(body, runtime)
    else:
        # Decoding and resizing a request's images takes tens of ms per megapixel: off the event loop,
        # so other requests' streams keep flowing (chat_job only reads the runtime).
        job = await asyncio.to_thread(chat_job, body, runtime)
    return await _generate(runtime, request, job, ChatBuilder)


@router.post("/v1/completions", dependencies=Authorized)
async def completions(body: CompletionRequest, request: Request, runtime: ReadyDep) -> Response:
    return await _generate(runtime, request, completion_job(body, runtime), CompletionBuilder)


# -- the Responses API (served as chat: lorayard.server.api.responses_serving) ------------------------------
def get_response_store(request: Request) -> ResponseStore:
    store: ResponseStore = request.app.state.responses
    return store


StoreDep = Annotated[ResponseStore, Depends(get_response_store)]


async def _replay(items: list[ChoiceDelta]) -> AsyncIterator[ChoiceDelta]:
    for item in items:
        yield item


@router.post("/v1/responses", dependencies=Authorized)
async def create_response(
    body: ResponsesRequest, request: Request, runtime: ReadyDep, store: StoreDep
) -> Response:
    owner = caller_digest(request)
    given = responses_input(body, store, owner)  # the store is read on the event loop only
    if runtime.image_processor is None:
        turn = responses_turn(body, runtime, given)
    else:  # images are decoded and resized off the event loop, as for chat
        turn = await asyncio.to_thread(responses_turn, body, runtime, given)
    with turn.errors_named():
        generation, stream = await _start(runtime, request, turn.job)
    served, headers = _served(generation)
    builder = ChatBuilder(served, runtime.tokenizer)
    assembler = ResponseAssembler(turn.skeleton.model_copy(update={"model": served.model}))
    if body.stream:
        errors: list[int] = []
        request.state.stream_errors = errors
        events = response_sse(
            assembler,
            builder.chunks(stream, generation.usage),
            errors,
            lambda response: turn.remember(store, owner, response),
        )
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers}
        )
    items = await _collect(stream, request)
    response = await assembler.run(builder.chunks(_replay(items), generation.usage))
    turn.remember(store, owner, response)
    return JSONResponse(response.model_dump(mode="json"), headers=headers)


def _stored(store: ResponseStore, request: Request, response_id: str) -> StoredResponse:
    stored = store.get(caller_digest(request), response_id)
    if stored is None:
        # Another key's response is answered the same: its existence is not revealed.
        raise APIError(
            404, f"no stored response {response_id!r}", param="response_id", code="response_not_found"
        )
    return stored


@router.get("/v1/responses/{response_id}", dependencies=Authorized)
async def get_response(response_id: str, request: Request, store: StoreDep) -> ResponseObject:
    return _stored(store, request, response_id).response


@router.get("/v1/responses/{response_id}/input_items", dependencies=Authorized)
async def list_input_items(
    response_id: str,
    request: Request,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> InputItemList:
    """The stored response's input items, newest first unless ``order=asc``, ``limit`` a page."""
    return input_item_page(_stored(store, request, response_id), limit, order, after)


@router.delete("/v1/responses/{response_id}", dependencies=Authorized)
async def delete_response(response_id: str, request: Request, store: StoreDep) -> ResponseDeleted:
    _stored(store, request, response_id)
    store.delete(caller_digest(request), response_id)
    return ResponseDeleted(id=response_id)


# -- tokenizer (vLLM's bodies) -------------------------------------------------------------------
@router.post("/tokenize", dependencies=Authorized)
async def tokenize(body: TokenizeRequest, runtime: ReadyDep) -> TokenizeResponse:
    ref, param = tokenize_adapter(body, runtime)
    async with adapter_lease(runtime.registry, ref, param) as lease:
        return tokenize_text(body, runtime, lease)


@router.post("/detokenize", dependencies=Authorized)
async def detokenize(body: DetokenizeRequest, runtime: ReadyDep) -> DetokenizeResponse:
    return detokenize_ids(body, runtime)
