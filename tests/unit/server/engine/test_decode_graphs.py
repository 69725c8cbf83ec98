"""DecodeGraphs: buckets, padding into static buffers, and (on CUDA) graph capture and replay.

The step under test is made of real parts: the tiny base's embedding, its first MLP with each row's
stacked LoRA, and its lm_head; rows are independent, so padded rows must leave the real ones alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lorayard.adapter_files import load_adapter
from lorayard.server.engine.decode_graphs import DecodeGraphs, StaticInput, batch_buckets, bucket_for
from lorayard.server.engine.lora_ops import FUSED_GROUPS, ResidentAdapter
from lorayard.server.engine.stacked_lora import ZERO_ROW, StackedLora

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_buckets_are_powers_of_two_up_to_the_batch_limit():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(256)[-2:] == (128, 256)
    with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
        batch_buckets(0)


def test_a_batch_goes_to_the_smallest_bucket_that_holds_it():
    buckets = batch_buckets(48)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 16, 17, 33, 48)] == [1, 2, 4, 8, 16, 32, 48, 48]
    assert bucket_for(49, buckets) is None  # past the largest: eager


def _mlp_step(device: str, tiny_base_dir, tiny_adapters):
    """A per-row step over the tiny base's own modules, with the stacked LoRA of two real adapters."""
    config = AutoConfig.from_pretrained(tiny_base_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).to(device).eval()
    stack = StackedLora.from_config(config, capacity=2, r_max=16, device=device, dtype=torch.float32)
    rows = [
        stack.write(
            slot,
            ResidentAdapter.from_weights(
                name, load_adapter(tiny_adapters / name, config), None, device=device, dtype=torch.float32
            ),
        )
        for slot, name in enumerate(("all8", "mlp16"))
    ]
    mlp = model.model.layers[0].mlp

    def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        selected = stack.select(inputs["adapter_rows"])
        h = model.model.embed_tokens(inputs["tokens"]) * (1 + inputs["positions"][:, None].float() / 100)
        gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        stack.apply_group(
            dict(zip(FUSED_GROUPS["gate_up"], (gate, up), strict=True)), h, 0, "gate_up", selected
        )
        act = mlp.act_fn(gate) * up
        out = stack.apply(mlp.down_proj(act), act, 0, "down_proj", selected)
        return model.lm_head(h + out).float()

    inputs = {
        "tokens": StaticInput(torch.long, pad=0),
        "positions": StaticInput(torch.long, pad=0),
        "adapter_rows": StaticInput(torch.long, pad=ZERO_ROW),
    }
    return step, inputs, [ZERO_ROW, *rows], config.vocab_size


def _batch(n: int, choices: list[int], vocab: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, vocab, (n,), generator=gen),
        "positions": torch.randint(0, 200, (n,), generator=gen),
        "adapter_rows": torch.tensor(choices)[torch.randint(0, len(choices), (n,), generator=gen)],
    }


@pytest.mark.parametrize("n", [1, 3, 5, 8, 11])
def test_padded_static_step_equals_the_eager_step_for_the_real_rows(n, tiny_base_dir, tiny_adapters):
    step, inputs, rows, vocab = _mlp_step("cpu", tiny_base_dir, tiny_adapters)
    eager = DecodeGraphs(step, inputs, 8, device="cpu", mode="eager")
    static = DecodeGraphs(step, inputs, 8, device="cpu", mode="static")
    batch = _batch(n, rows, vocab, seed=n)
    with torch.inference_mode():
        expected = eager.run(batch)
        got = static.run(batch)
    assert got.shape == expected.shape == (n, vocab)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert static.last_bucket == bucket_for(n, (1, 2, 4, 8))  # None for 11: eager, unpadded
    if static.last_bucket is not None and static.last_bucket > n:  # the padding holds the pad values
        assert torch.equal(
            static.buffers["adapter_rows"][n : static.last_bucket],
            torch.zeros(static.last_bucket - n, dtype=torch.long),
        )


def test_a_smaller_batch_after_a_larger_one_sees_no_stale_rows(tiny_base_dir, tiny_adapters):
    step, inputs, rows, vocab = _mlp_step("cpu", tiny_base_dir, tiny_adapters)
    static = DecodeGraphs(step, inputs, 8, device="cpu", mode="static")
    with torch.inference_mode():
        static.run(_batch(8, rows, vocab, seed=1))
        small = _batch(3, rows, vocab, seed=2)
        got = static.run(small)
        expected = step(small)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert static.buffers["tokens"][3].item() == 0  # row 3 of bucket 4 was padded, not left from before


def test_bad_calls_are_refused_with_the_reason(tiny_base_dir, tiny_adapters):
    step, inputs, rows, vocab = _mlp_step("cpu", tiny_base_dir, tiny_adapters)
    with pytest.raises(ValueError, match="mode 'graph' needs a CUDA device"):
        DecodeGraphs(step, inputs, 8, device="cpu", mode="graph")
    with pytest.raises(ValueError, match="buckets must be ascending"):
        DecodeGraphs(step, inputs, 8, device="cpu", mode="static", buckets=(4, 2))
    static = DecodeGraphs(step, inputs, 8, device="cpu", mode="static")
    batch = _batch(2, rows, vocab, seed=0)
    with pytest.raises(ValueError, match="the step takes inputs"):
        static.run({k: v for k, v in batch.items() if k != "positions"})
    with pytest.raises(ValueError, match="the same number of rows"):
        static.run({**batch, "tokens": batch["tokens"][:1]})


@cuda
def test_graph_replay_equals_the_eager_step_on_cuda(tiny_base_dir, tiny_adapters):
    step, inputs, rows, vocab = _mlp_step("cuda", tiny_base_dir, tiny_adapters)
    graphs = DecodeGraphs(step, inputs, 16, device="cuda", mode="graph")
    with torch.inference_mode():
        graphs.capture_all()
        assert graphs.captured == (1, 2, 4, 8, 16)
        pointers = {k: b.data_ptr() for k, b in graphs.buffers.items()}
        for n in (1, 3, 16, 7, 2):
            batch = _batch(n, rows, vocab, seed=n)
            expected = step({k: v.cuda() for k, v in batch.items()})
            got = graphs.run(batch)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            assert graphs.last_bucket == bucket_for(n, graphs.buckets)
        assert {k: b.data_ptr() for k, b in graphs.buffers.items()} == pointers
        assert graphs.run(_batch(17, rows, vocab, seed=17)).shape == (17, vocab)  # eager past 16
        assert graphs.last_bucket is None


@cuda
def test_a_rewritten_stacked_row_is_seen_by_a_captured_graph(tiny_base_dir, tiny_adapters):
    """Evict and rewrite in place: the graph captured before computes with the new adapter."""
    config = AutoConfig.from_pretrained(tiny_base_dir)
    stack = StackedLora.from_config(config, capacity=1, r_max=16, device="cuda", dtype=torch.float32)

    def resident(name: str) -> ResidentAdapter:
        weights = load_adapter(tiny_adapters / name, config)
        return ResidentAdapter.from_weights(name, weights, None, device="cuda", dtype=torch.float32)

    row = stack.write(0, resident("all8"))
    x = torch.randn(4, config.hidden_size, device="cuda")

    def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        y = torch.zeros(inputs["rows"].shape[0], config.intermediate_size, device="cuda")
        return stack.apply(y, x[: y.shape[0]], 0, "up_proj", stack.select(inputs["rows"]))

    graphs = DecodeGraphs(
        step, {"rows": StaticInput(torch.long, pad=ZERO_ROW)}, 4, device="cuda", mode="graph"
    )
    with torch.inference_mode():
        before = graphs.run({"rows": torch.full((4,), row)}).clone()
        stack.evict(0)
        assert stack.write(1, resident("mlp16")) == row
        after = graphs.run({"rows": torch.full((4,), row)})
        expected = step({"rows": torch.full((4,), row, device="cuda")})
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)
