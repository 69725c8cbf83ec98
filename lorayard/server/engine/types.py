"""The only types that cross api -> engine.

The API layer parses HTTP into a :class:`Request` (prompt ids, :class:`SamplingParams`, an acquired
adapter handle) and consumes :class:`TokenEvent` s; it never touches tensors. The engine never sees
HTTP, text or adapter names beyond the handle.

Engine contract (``lorayard.server.engine.engine.Engine``)::

    engine = Engine.from_base(base, settings.engine_config(), eos_token_ids=...)  # in lorayard.server.runtime
    engine.start()                                # starts the engine thread
    stream = engine.submit(request)               # -> RequestStream; raises InvalidRequest (a bad id, a
                                                  # schema that does not compile), PromptTooLong,
                                                  # QueueFull, EngineStopped
    await asyncio.to_thread(engine.guided.compile, params.guided)  # optional, before submit: a new
                                                  # schema's compile (ms) off the event loop; cached
    async for event in stream: ...                # TokenEvent per decode step, last one has finish_reason
    engine.abort(request_id)                      # client went away / stop string hit: frees its blocks
    engine.stats() -> EngineStats                 # running, waiting, batch size, KV blocks: the snapshot
                                                  # the engine thread publishes after every step
    await engine.drain(timeout_s); engine.stop()  # SIGTERM: finish in-flight, then stop the thread
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from lorayard.adapter_files import AdapterWeights
    from lorayard.server.engine.guided import GuidedCompiler

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class GuidedDecoding:
    """Structured output: any JSON object, JSON valid against ``schema`` (JSON Schema as text), or an
    xgrammar structural tag (``schema``: its JSON text; tool calls are one)."""

    kind: Literal["json_object", "json_schema", "structural_tag"]
    schema: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; top_k 0 means off.

    ``max_tokens`` 0 is allowed together with ``prompt_logprobs`` (scoring a prompt, as lm-eval does):
    the request finishes after its prefill with reason "length" and no token.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    """No stop token is honoured before this many tokens (vLLM extension)."""
    ignore_eos: bool = False
    """Keep generating through end-of-turn tokens until max_tokens (vLLM extension, for benchmarks)."""
    stop_token_ids: frozenset[int] = frozenset()
    """Extra token ids that stop generation, on top of the model's end-of-turn ids."""
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    """If set, return the chosen token's logprob and this many top alternatives per step."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling (OpenAI semantics, bias in -100..100)."""
    prompt_logprobs: int | None = None
    """If set, the first event carries every prompt token's logprob (the first one None) and this many
    top alternatives, computed in the engine's own prefill with the request's adapter applied."""
    guided: GuidedDecoding | None = None
    """Constrain the output to a grammar (structured output); None: unconstrained."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class AdapterHandle(Protocol):
    """An adapter acquired from the registry: pinned (never evicted) until released."""

    @property
    def name(self) -> str:
        """The adapter's name (the ``model`` that addresses its latest version)."""
        ...

    @property
    def key(self) -> str:
        """``name@vN`` (or ``name`` for a plain PEFT folder): unique per immutable version."""
        ...

    @property
    def slot(self) -> int:
        """What ``Engine.load_adapter_weights`` returned for its weights: their key among the engine's
        resident adapters."""
        ...


@dataclass(frozen=True)
class ImageInputs:
    """A request's images, preprocessed by the base's image processor (``lorayard.vision``): what the
    vision tower reads. The prompt holds each image's placeholder tokens already expanded, in order."""

    pixel_values: torch.Tensor
    """[patches, channels * temporal patch * patch * patch], every image's patches one after another."""
    grid_thw: tuple[tuple[int, int, int], ...]
    """Per image, its patch grid (temporal, height, width)."""
    hashes: tuple[str, ...]
    """Per image, the sha256 of its encoded bytes: part of the prefix-cache key of its request."""


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterHandle | None = None
    """None: the plain base model."""
    images: ImageInputs | None = None
    """A vision-language base's images for the prompt's image-pad tokens; None: text only."""


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class PromptLogprob:
    """One prompt token's logprob under the model (and adapter), with the top alternatives."""

    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One step of one request: the new token (if any) and, on the last event, why it finished."""

    token_id: int | None
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    """Set (with finish_reason "abort") when the engine failed this request; the API answers 500."""
    prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None
    """On the first event of a request with ``prompt_logprobs``: one entry per prompt token, None first."""
    cached_tokens: int | None = None
    """Prompt tokens whose K/V came from the prefix cache at admission (OpenAI's
    usage.prompt_tokens_details.cached_tokens); None: the request was never admitted."""


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    batch_size: int
    kv_cache_usage: float
    """Fraction of KV blocks held by live requests, 0..1 (cached, unreferenced blocks count as free)."""
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    """Blocks held by live requests."""
    kv_blocks_cached: int = 0
    """Blocks no live request holds that keep a cached prefix (reclaimed least recently used first)."""
    preemptions: int = 0
    """Requests preempted since start (the pool ran dry mid-decode; recomputed when readmitted)."""
    step_preemptions: int = 0
    """Of those, the ones preempted in the step this snapshot follows (what a counter adds)."""
    kv_books_error: str | None = None
    """Set when the engine went idle with KV blocks still in use: the pool's accounting of the leak."""
    running_adapters: tuple[str, ...] = ()
    """Names of the adapters of the running requests, each once, sorted (the base model is none)."""
    waiting_adapters: tuple[str, ...] = ()
    """Names of the adapters of the waiting requests, each once, sorted."""

    @property
    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0


class EngineError(Exception):
    """Base of engine errors."""


class QueueFull(EngineError):
    """More than --max-queue requests are waiting; the API answers 429 with Retry-After."""


class EngineStopped(EngineError):
    """The engine is draining or stopped; the API answers 503."""


class InvalidRequest(EngineError, ValueError):
    """The request cannot run as asked (a token id outside the vocabulary, a grammar that does not
    compile, ...); the API answers 400. The API validates first; this is the engine's own guard.

    ``param`` names the offending :class:`Request` / :class:`SamplingParams` field (``prompt_ids``,
    ``stop_token_ids``, ``logit_bias``, ``guided``, ...), for the error's ``param``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BlockAccountingError(RuntimeError):
    """The KV pool's books do not balance: a block leaked, is double-freed, or is in two states.

    A RuntimeError, not an AssertionError: it reports a broken invariant of running code, and an
    ``except AssertionError`` written for assert statements must not swallow it."""


class PromptTooLong(EngineError):
    """prompt + max_tokens exceed the context window (--max-model-len); the API answers 400."""


class ServingEngine(Protocol):
    """What the API layer, the registry and the runtime use of an engine: ours
    (``lorayard.server.engine.engine.Engine``) or vLLM's behind ``--engine vllm``
    (``lorayard.server.engine_vllm.engine.VllmEngine``). The contract is the module docstring's."""

    hf_config: PretrainedConfig
    vocab_size: int
    max_model_len: int
    device: str

    @property
    def guided(self) -> GuidedCompiler | None: ...

    @guided.setter
    def guided(self, compiler: GuidedCompiler | None) -> None: ...

    def start(self) -> None: ...

    def submit(self, request: Request) -> AsyncIterator[TokenEvent]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def drain(self, timeout_s: float) -> None: ...

    def stop(self) -> None: ...

    def load_adapter_weights(self, key: str, weights: AdapterWeights, folder: Path | None = None) -> int:
        """Make a validated version resident (``folder``: its files, what vLLM loads); its slot."""
        ...

    def free_adapter_weights(self, slot: int) -> None: ...
