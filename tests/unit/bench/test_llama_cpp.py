"""The llama_cpp suite's bookkeeping: token counting, run summaries, paired ratios, the min_tokens
transport and the report; no llama.cpp needed (the suite itself needs llama-cpp-python's server)."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from bench import llama_cpp, report
from bench.record import MachineInfo, SuiteResult, write_result


def _row(repeat, server, tps, concurrency=4, variant=llama_cpp.BASE, ttft=100.0):
    return {
        "repeat": repeat,
        "concurrency": concurrency,
        "variant": variant,
        "server": server,
        "tokens_per_s": tps,
        "ttft_p50_ms": ttft,
        "ttft_p99_ms": ttft,
        "itl_p50_ms": 10.0,
        "completed": 8,
        "errors": 0,
        "finished_by_length": 8,
        "tokens_counted_by": ["usage"] if server == llama_cpp.OURS else ["length"],
    }


def test_paired_ratios_pair_within_a_repeat_and_skip_unpaired():
    rows = [
        _row(0, llama_cpp.OURS, 30.0),
        _row(0, llama_cpp.LLAMA, 60.0),
        _row(1, llama_cpp.LLAMA, 40.0),
        _row(1, llama_cpp.OURS, 80.0),
        _row(2, llama_cpp.OURS, 50.0),  # its llama.cpp run is missing
        _row(0, llama_cpp.OURS, 1.0, concurrency=16),
    ]
    assert llama_cpp.ours_over_llama(rows, llama_cpp.BASE, 4, "tokens_per_s") == [0.5, 2.0]
    assert llama_cpp.ours_over_llama(rows, llama_cpp.LORA, 4, "tokens_per_s") == []


def test_server_order_alternates_and_requests_have_a_floor():
    assert llama_cpp.server_order(0, 0) == (llama_cpp.OURS, llama_cpp.LLAMA)
    assert llama_cpp.server_order(1, 0) == (llama_cpp.LLAMA, llama_cpp.OURS)
    assert llama_cpp.server_order(1, 1) == (llama_cpp.OURS, llama_cpp.LLAMA)
    assert llama_cpp.requests_for(1) == llama_cpp.MIN_REQUESTS_PER_RUN
    assert llama_cpp.requests_for(16) == 32


def test_min_tokens_transport_adds_the_field_to_post_bodies():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, json.loads(request.content) if request.content else None))
        return httpx.Response(200, json={"ok": True})

    async def go():
        transport = llama_cpp.MinTokensTransport(64, 4, inner=httpx.MockTransport(handler))
        async with httpx.AsyncClient(transport=transport) as client:
            await client.post("http://x/v1/completions", json={"prompt": "hi", "max_tokens": 64})
            await client.get("http://x/v1/models")

    asyncio.run(go())
    assert seen == [("POST", {"prompt": "hi", "max_tokens": 64, "min_tokens": 64}), ("GET", None)]


def test_missing_llama_python_exits_2_with_build_instructions(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        llama_cpp._check_llama_python(tmp_path / "no-such-python")
    assert exited.value.code == 2
    assert "pip install 'llama-cpp-python[server]==" in capsys.readouterr().err


@pytest.mark.parametrize("lora_ran", [True, False])
def test_details_plot_and_report_from_rows(tmp_path, lora_ran):
    """What the suite writes, from synthetic rows: table, PNG, and its section in the README."""
    args = llama_cpp.parse_args(["--concurrency", "1", "4", "--repeats", "2"])
    variants = [llama_cpp.BASE, llama_cpp.LORA] if lora_ran else [llama_cpp.BASE]
    rows = [
        _row(r, s, 20.0 + r + (s == llama_cpp.OURS) * 10, concurrency=c, variant=v)
        for r in range(2)
        for c in args.concurrency
        for v in variants
        for s in llama_cpp.SERVERS
    ]
    result = SuiteResult(
        suite="llama_cpp",
        command="python -m bench.llama_cpp",
        machine=MachineInfo.current("cpu"),
        config={
            "concurrency": args.concurrency,
            "precision": {llama_cpp.OURS: "float32", llama_cpp.LLAMA: "Q4_1"},
            "per_request_lora": llama_cpp.PER_REQUEST_LORA_NOTE,
            "gguf": "model.Q4_1.gguf",
            "llama_cpp_python": "0.0.0",
            "lora": {"adapter": "a0000-r8", "ran": lora_ran, "reason": None if lora_ran else "not run: x"},
            "probes": [
                {"variant": "base", "server": "ours", "prompt_tokens": 9, "completion_tokens": 4}
                | {"finish_reason": "length", "text": "a | b\nc"}
            ],
        },
        rows=rows,
    )
    llama_cpp.add_headlines(result, args.concurrency)
    assert len(result.headline) == (7 if lora_ran else 4)
    assert all(math.isfinite(h["value"]) for h in result.headline)
    out = tmp_path / "llama_cpp"
    write_result(result, out, llama_cpp.details(result))
    llama_cpp._plot(result, out)
    table = (out / "table.md").read_text()
    assert "a / b c" in table
    assert ("not run: x" in table) != lora_ran
    assert (out / "llama_cpp.png").is_file()
    assert "### llama_cpp" in report.build(tmp_path)
