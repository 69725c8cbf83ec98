"""The load tester and the CLI against the real server: its numbers must match the server's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from lorayard.client import LorayardClient
from lorayard.client.__main__ import main
from prometheus_client.parser import text_string_to_metric_families


def _output_token_histogram(client: LorayardClient) -> dict[str, tuple[float, float]]:
    """adapter label -> (sum, count) of the server's per-request output-token histogram."""
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(client.metrics_text()):
        if family.name != "lorayard_output_tokens":
            continue
        for sample in family.samples:
            entry = totals.setdefault(sample.labels.get("adapter", ""), [0.0, 0.0])
            if sample.name.endswith("_sum"):
                entry[0] = sample.value
            elif sample.name.endswith("_count"):
                entry[1] = sample.value
    return {label: (values[0], values[1]) for label, values in totals.items()}


def test_loadtest_agrees_with_server_usage_and_metrics(server, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAYARD_API_KEY", server.api_key)
    out, plot = tmp_path / "results.json", tmp_path / "results.png"
    with LorayardClient(server.base_url) as client:
        before = _output_token_histogram(client)
        code = main(
            [
                "loadtest", "--base-url", server.base_url, "--adapters", "alpha,beta", "--weights", "2,1",
                "--concurrency", "4", "--requests", "12", "--max-tokens", "8", "--stream", "--seed", "3",
                "--out", str(out), "--plot", str(plot),
            ]
        )  # fmt: skip
        after = _output_token_histogram(client)
    assert code == 0
    result = json.loads(out.read_text())
    assert plot.read_bytes()[:4] == b"\x89PNG"

    assert result["requests"] == result["completed"] == 12 and result["errors"] == {}
    assert result["stopped_by"] == "requests"
    samples = result["samples"]
    assert Counter(s["adapter"] for s in samples) == {
        k: v["requests"] for k, v in result["per_adapter"].items()
    }
    assert set(result["per_adapter"]) <= {"alpha", "beta"}
    for label, part in result["per_adapter"].items():
        served_sum, served_count = (
            a - b for a, b in zip(after[label], before.get(label, (0, 0)), strict=True)
        )
        assert part["output_tokens"] == served_sum
        assert part["requests"] == served_count
        assert part["output_tokens"] == sum(s["output_tokens"] for s in samples if s["adapter"] == label)
    assert result["output_tokens"] == sum(p["output_tokens"] for p in result["per_adapter"].values())
    assert all(1 <= s["output_tokens"] <= 8 for s in samples)
    assert result["ttft_ms"]["count"] == 12
    assert result["e2e_ms"]["p50"] >= result["ttft_ms"]["p50"] > 0
    assert result["e2e_ms"]["p99"] >= result["e2e_ms"]["p90"] >= result["e2e_ms"]["p50"]
    assert result["output_tokens_per_s"] == pytest.approx(result["output_tokens"] / result["duration_s"])
    assert result["config"]["adapters"] == ["alpha", "beta"] and result["machine"]["cpu_count"] >= 1


def _cli(server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAYARD_API_KEY": server.api_key, "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "lorayard.client", *args, "--base-url", server.base_url],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_cli_chat_streams_the_same_answer_and_models_lists_adapters(server):
    question = "Name a colour."
    chat = _cli(server, "chat", "--adapter", "beta", "--max-tokens", "8", "--temperature", "0", question)
    assert chat.returncode == 0, chat.stderr
    with LorayardClient(server.base_url, api_key=server.api_key) as client:
        expected = client.chat(
            [{"role": "user", "content": question}], adapter="beta", max_tokens=8, temperature=0
        )
    assert chat.stdout == expected.text + "\n"
    assert "output tokens" in chat.stderr

    models = _cli(server, "models")
    assert models.returncode == 0, models.stderr
    assert "alpha" in models.stdout and "beta" in models.stdout and "adapter" in models.stdout

    missing = _cli(server, "chat", "--adapter", "nope", "--max-tokens", "4", "hi")
    assert missing.returncode == 1 and "404" in missing.stderr
