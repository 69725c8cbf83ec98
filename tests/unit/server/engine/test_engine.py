import asyncio
import uuid

import pytest
from transformers import AutoConfig

from lorayard.adapter_files import load_adapter
from lorayard.server.engine.types import PromptTooLong, QueueFull, Request, SamplingParams

from ..conftest import ADAPTER_SPECS, peft_greedy


class _Handle:
    def __init__(self, key: str, slot: int) -> None:
        self.name = key.split("@")[0]
        self.key = key
        self.slot = slot


def _load(engine, tiny_base_dir, tiny_adapters, name):
    weights = load_adapter(tiny_adapters / name, AutoConfig.from_pretrained(tiny_base_dir))
    return _Handle(name, engine.load_adapter_weights(name, weights))


async def _collect(engine, request):
    stream = engine.submit(request)
    events = [event async for event in stream]
    return [e.token_id for e in events if e.token_id is not None], events[-1]


PROMPTS = [[1, 9690, 198, 2683, 359, 253], [1, 4093, 198, 19556, 30, 2], [1, 520, 33, 44, 55, 66, 77, 88, 99]]


@pytest.mark.parametrize(
    ("fuse_linears", "decode_mode"),
    [(False, "eager"), (True, "eager"), (True, "static")],
    ids=["separate-linears", "fused-linears", "fused-linears-static-decode"],
)
def test_mixed_adapter_batches_match_peft_greedy(
    make_engine, fuse_linears, decode_mode, tiny_base_dir, tiny_adapters
):
    """Concurrent, staggered requests for different adapters (and none) each equal plain PEFT, with the
    CPU's separate q/k/v and gate/up matmuls, with the GPU's fused ones, and with the GPU's static
    decode step (DoRA rows decode packed)."""
    engine = make_engine(
        max_batch_size=8, max_model_len=256, fuse_linears=fuse_linears, decode_mode=decode_mode
    )
    handles = {name: _load(engine, tiny_base_dir, tiny_adapters, name) for name in ADAPTER_SPECS}
    names = [*ADAPTER_SPECS, None, "qv4", "all8"]
    cases = [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate(names)]
    max_tokens = 12

    async def run():
        engine.start()
        tasks = []
        for i, (name, prompt) in enumerate(cases):
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
            request = Request(uuid.uuid4().hex, prompt, params, handles[name] if name else None)
            tasks.append(asyncio.create_task(_collect(engine, request)))
            await asyncio.sleep(0.01 * i)  # join a batch already decoding
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    for (name, prompt), (tokens, last) in zip(cases, results, strict=True):
        expected = peft_greedy(tiny_base_dir, tiny_adapters / name if name else None, prompt, max_tokens)
        assert tokens == expected, name
        assert last.finish_reason == "length"
        assert last.output_tokens == max_tokens
    base_tokens = results[names.index(None)][0]
    assert any(r[0] != base_tokens for r in results[: len(ADAPTER_SPECS)]), "adapters must change the output"


def test_long_prompt_is_chunked_and_matches(engine, tiny_base_dir, tiny_adapters):
    engine.scheduler.prefill_chunk = engine.scheduler.idle_prefill_chunk = 7
    handle = _load(engine, tiny_base_dir, tiny_adapters, "all8")
    prompt = [(i * 37) % 5000 + 3 for i in range(40)]

    async def run():
        engine.start()
        return await _collect(
            engine, Request("r", prompt, SamplingParams(max_tokens=6, temperature=0.0), handle)
        )

    tokens, _ = asyncio.run(run())
    assert tokens == peft_greedy(tiny_base_dir, tiny_adapters / "all8", prompt, 6)


def test_limits_and_abort(make_engine):
    engine = make_engine(max_batch_size=1, max_queue=1, max_model_len=64)

    async def run():
        engine.start()
        with pytest.raises(PromptTooLong):
            engine.submit(Request("long", [5] * 60, SamplingParams(max_tokens=10)))
        long_running = engine.submit(Request("a", [5, 6], SamplingParams(max_tokens=50, temperature=0.0)))
        await long_running.__anext__()  # "a" is running and holds the only slot
        engine.submit(Request("b", [5, 6], SamplingParams(max_tokens=2)))
        with pytest.raises(QueueFull):
            engine.submit(Request("c", [5, 6], SamplingParams(max_tokens=2)))
        engine.abort("a")
        events = [e async for e in long_running]
        assert events[-1].finish_reason == "abort"
        assert events[-1].output_tokens < 50
        await engine.drain(10)
        return engine.stats()

    stats = asyncio.run(run())
    assert stats.running == 0 and stats.waiting == 0
    engine.check_kv()  # the aborted and finished requests hold no blocks


def test_4bit_base_with_adapter_matches_peft_on_the_same_4bit_base(make_engine, tiny_base_dir, tiny_adapters):
    """QLoRA-style serving: NF4 base (bitsandbytes) + LoRA on top equals PEFT over the same NF4 base."""
    from transformers import BitsAndBytesConfig

    engine = make_engine(quantization="4bit", max_batch_size=2, max_model_len=64)
    handle = _load(engine, tiny_base_dir, tiny_adapters, "qv4")

    async def run():
        engine.start()
        return await _collect(
            engine, Request("q", PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0), handle)
        )

    tokens, _ = asyncio.run(run())
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype="float32",
    )
    expected = peft_greedy(tiny_base_dir, tiny_adapters / "qv4", PROMPTS[0], 6, quantization_config=nf4)
    assert tokens == expected
