"""bench.op_profile: op categories, and self times read back from a real Chrome trace the torch profiler
wrote (the form vLLM saves its profiles in) agree with the profiler's own ``key_averages``."""

from __future__ import annotations

import json

import pytest
import torch

from bench import op_profile


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("aten::addmm", op_profile.GEMM),
        ("mkldnn::_linear_pointwise", op_profile.GEMM),
        ("_C::onednn_mm", op_profile.GEMM),
        ("aten::scaled_dot_product_attention", "attention"),
        ("_C::cpu_attention_with_kv_cache", "attention"),
        ("aten::index_select", "KV cache writes and gathers"),
        ("_C::cpu_attn_reshape_and_cache", "KV cache writes and gathers"),
        ("aten::mul", op_profile.OTHER_OPS),
        ("aten::linear", op_profile.OTHER_OPS),  # its time is the addmm inside it
    ],
)
def test_categories_cover_ours_and_vllms_cpu_ops(op, expected):
    assert op_profile.category(op) == expected


def test_self_times_from_a_chrome_trace_match_key_averages(tmp_path):
    x, w, b = torch.randn(64, 256), torch.randn(512, 256), torch.randn(512)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(20):
            torch.nn.functional.silu(torch.nn.functional.linear(x, w, b)).sum()
    trace_path = tmp_path / "trace.json"
    profiler.export_chrome_trace(str(trace_path))
    expected = {e.key: e.self_cpu_time_total for e in profiler.key_averages()}

    ops = {row["op"]: row["self_cpu_us"] for row in op_profile.trace_ops(json.loads(trace_path.read_text()))}

    assert set(ops) == set(expected)
    for name, us in expected.items():
        assert ops[name] == pytest.approx(us, rel=0.05, abs=5.0), name
    # nested ops are not counted twice: the children's time leaves aten::linear's self time small
    assert ops["aten::linear"] < ops["aten::addmm"]
