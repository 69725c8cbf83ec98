"""Soak test: a real server under mixed, misbehaving load for a bounded time; then check it is clean.

``python -m bench.soak`` (``make soak``) starts ``lorayard serve`` on 127.0.0.1 over a fresh volume of
random adapters (real embedded base by default, ``--tiny`` for a tiny random one), runs ``--concurrency``
closed-loop clients for ``--duration`` seconds (mixed adapters and pinned versions, streamed and not,
random cancels mid-stream and disconnects before the answer), and then checks:

* zero 5xx answers,
* no leaked requests or KV blocks: ``lorayard_num_requests_running``, ``_waiting`` and the used
  blocks of ``lorayard_kv_cache_blocks`` on /metrics back to 0,
* the server's resident memory (VmRSS from /proc) grew under ``--max-rss-growth`` between the end of
  warm-up and the end of the run.

It writes ``result.json`` and ``README.md`` under ``--out`` and exits 1 if a check failed. Everything is
bounded by ``--max-duration`` (a hard cap that kills the server).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lorayard.base_model import default_base_model, resolve_base_model
from lorayard.testing.random_base import TINY, build_random_base
from lorayard.testing.server import metric_value, rss_bytes, start_server

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "soak"
ADAPTERS = ("alpha", "beta", "gamma")
PROMPTS = (
    "Tell me about the sea.",
    "What is two plus two?",
    "Write a haiku about autumn.",
    "Explain what a LoRA adapter is in one sentence.",
    "List three colours.",
    "Who are you?",
)


@dataclass
class SoakConfig:
    duration_s: float
    warmup_s: float
    concurrency: int
    max_tokens: int
    cancel_rate: float
    disconnect_rate: float
    max_rss_growth: float
    max_duration_s: float
    tiny: bool
    seed: int


@dataclass
class Tally:
    """What the clients saw, by outcome."""

    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    cancelled_mid_stream: int = 0
    disconnected_early: int = 0
    completed: int = 0
    output_tokens: int = 0
    per_adapter: collections.Counter[str] = field(default_factory=collections.Counter)


def _publish_random_adapters(base_spec: str, volume_dir: Path) -> None:
    """Two versions of each adapter (different ranks and targets), published like the training job does."""
    import torch

    from lorayard.base_model import load_base_model
    from lorayard.testing.random_adapter import build_random_adapter
    from lorayard.volume import AdapterVolume, BaseModelRef, Manifest

    base = resolve_base_model(base_spec)
    volume = AdapterVolume(volume_dir)
    model = load_base_model(base, device="cpu", dtype=torch.float32)
    targets = (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["up_proj", "down_proj"])
    for seed, (name, target) in enumerate(zip(ADAPTERS, targets, strict=True)):
        for version in (1, 2):
            with volume.staging(name) as staged:
                lora = {"r": 4 * version, "lora_alpha": 8, "target_modules": target}
                model = build_random_adapter(model, staged, seed * 10 + version, **lora).unload()
                manifest = Manifest(
                    name=name, version=0, base_model=BaseModelRef(id=base.model_id, sha256=base.fingerprint)
                )
                volume.publish(staged, manifest)


async def _one_request(client: httpx.AsyncClient, rng: random.Random, cfg: SoakConfig, tally: Tally) -> None:
    adapter = rng.choice([None, *ADAPTERS, "alpha@v1", "beta@v2"])
    body: dict[str, object] = {
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": rng.randint(1, cfg.max_tokens),
        "temperature": rng.choice([0.0, 0.7, 1.0]),
        "seed": rng.randint(0, 1000),
        "ignore_eos": rng.random() < 0.5,
    }
    if adapter is not None:
        body["adapter"] = adapter
    tally.per_adapter[adapter or "base"] += 1
    roll = rng.random()
    if roll < cfg.cancel_rate:
        # Stream, read a few chunks, hang up: the server must free the slot.
        body |= {"stream": True, "ignore_eos": True, "max_tokens": cfg.max_tokens}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            tally.statuses[str(response.status_code)] += 1
            lines = 0
            async for _line in response.aiter_lines():
                lines += 1
                if lines >= rng.randint(1, 4):
                    break
        tally.cancelled_mid_stream += 1
        return
    if roll < cfg.cancel_rate + cfg.disconnect_rate:
        # Not streamed; give up before the answer comes (a client timeout closes the connection).
        body |= {"ignore_eos": True, "max_tokens": cfg.max_tokens}
        try:
            response = await asyncio.wait_for(
                client.post("/v1/chat/completions", json=body), rng.uniform(0.05, 1)
            )
            tally.statuses[str(response.status_code)] += 1
        except TimeoutError:
            tally.disconnected_early += 1
        return
    if rng.random() < 0.5:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            tally.statuses[str(response.status_code)] += 1
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tally.output_tokens += usage["completion_tokens"]
    else:
        response = await client.post("/v1/chat/completions", json=body)
        tally.statuses[str(response.status_code)] += 1
        if response.status_code == 200:
            tally.output_tokens += response.json()["usage"]["completion_tokens"]
    tally.completed += 1


async def _load(base_url: str, cfg: SoakConfig, pid: int, tally: Tally) -> dict[str, float]:
    """Run the clients until the deadline; sample RSS at the end of warm-up."""
    started = time.monotonic()
    deadline = started + cfg.duration_s
    rss: dict[str, float] = {}
    limits = httpx.Limits(max_connections=cfg.concurrency * 2)

    async def worker(index: int) -> None:
        rng = random.Random(cfg.seed * 1000 + index)
        async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
            while time.monotonic() < deadline:
                try:
                    await _one_request(client, rng, cfg, tally)
                except httpx.HTTPError as exc:
                    tally.statuses[f"client:{type(exc).__name__}"] += 1

    async def sampler() -> None:
        await asyncio.sleep(cfg.warmup_s)
        rss["warm_bytes"] = rss_bytes(pid)
        rss["warm_at_s"] = round(time.monotonic() - started, 1)

    await asyncio.gather(sampler(), *(worker(i) for i in range(cfg.concurrency)))
    return rss


def _wait_idle(base_url: str, timeout: float = 60) -> dict[str, float]:
    """Poll /metrics until no request is running or waiting (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(base_url + "/metrics", timeout=10).text
        gauges = {
            "running": metric_value(text, "lorayard_num_requests_running"),
            "waiting": metric_value(text, "lorayard_num_requests_waiting"),
            "kv_blocks_used": metric_value(text, "lorayard_kv_cache_blocks", state="used"),
        }
        if (gauges["running"] == 0 and gauges["waiting"] == 0) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.5)


def run_soak(cfg: SoakConfig, work: Path) -> dict[str, object]:
    """Build the volume, start the server, load it, check it; returns the result document."""
    base_spec = (
        str(build_random_base(resolve_base_model().path, work / "tiny-base", TINY))
        if cfg.tiny
        else default_base_model()
    )
    volume_dir = work / "adapters"
    _publish_random_adapters(base_spec, volume_dir)
    server_args = [
        *("--adapters-dir", str(volume_dir), "--base-model", base_spec),
        *("--max-batch-size", "16", "--max-model-len", "512", "--poll-interval", "0.5"),
        *("--log-level", "warning"),
    ]
    server = start_server(server_args, work / "server.log", timeout=300)
    process, base_url = server.process, server.base_url
    tally = Tally()
    try:
        started = time.monotonic()
        rss = asyncio.run(asyncio.wait_for(_load(base_url, cfg, process.pid, tally), cfg.max_duration_s))
        load_s = time.monotonic() - started
        gauges = _wait_idle(base_url)
        rss["end_bytes"] = rss_bytes(process.pid)
        metrics_text = httpx.get(base_url + "/metrics", timeout=10).text
    finally:
        server.stop()
    growth = rss["end_bytes"] / rss["warm_bytes"] - 1
    server_errors = sum(n for status, n in tally.statuses.items() if status.startswith("5"))
    checks = {
        "no_5xx": server_errors == 0,
        "no_leaked_requests": gauges["running"] == 0 and gauges["waiting"] == 0,
        "no_leaked_kv_blocks": gauges["kv_blocks_used"] == 0,
        "rss_growth_under_limit": growth < cfg.max_rss_growth,
        "server_exited_cleanly": process.returncode == 0,
    }
    requests_total = {
        ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "lorayard_requests_total"
    }
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "config": asdict(cfg),
        "load_seconds": round(load_s, 1),
        "client_statuses": dict(tally.statuses),
        "requests_completed": tally.completed,
        "cancelled_mid_stream": tally.cancelled_mid_stream,
        "disconnected_before_answer": tally.disconnected_early,
        "requests_per_adapter": dict(tally.per_adapter),
        "output_tokens": tally.output_tokens,
        "gauges_after": gauges,
        "rss": {
            "warm_mib": round(rss["warm_bytes"] / 2**20, 1),
            "end_mib": round(rss["end_bytes"] / 2**20, 1),
            "growth_ratio": round(growth, 4),
            "warm_sampled_at_s": rss["warm_at_s"],
        },
        "server_requests_total": requests_total,
        "server_exit_code": process.returncode,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
    }


def _write_readme(out: Path, result: dict[str, object], command: str) -> None:
    checks = result["checks"]
    assert isinstance(checks, dict)
    rows = "\n".join(f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in checks.items())
    rss = result["rss"]
    assert isinstance(rss, dict)
    text = f"""# Soak result

Written by `python -m bench.soak`; reproduce with:

```bash
{command}
```

| check | result |
|---|---|
{rows}

- load: {result["load_seconds"]} s, client statuses {result["client_statuses"]}
- completed {result["requests_completed"]}, cancelled mid-stream {result["cancelled_mid_stream"]},
  disconnected before the answer {result["disconnected_before_answer"]},
  output tokens {result["output_tokens"]}
- per adapter: {result["requests_per_adapter"]}
- server RSS: {rss["warm_mib"]} MiB after warm-up ({rss["warm_sampled_at_s"]} s)
  -> {rss["end_mib"]} MiB at the end (growth {rss["growth_ratio"]:.2%})
- gauges after the load: {result["gauges_after"]}

Everything else (config, the server's own `lorayard_requests_total`, machine) is in `result.json`.
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of load (default 300)")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds before the first RSS sample (20%%)"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--cancel-rate", type=float, default=0.1, help="share of streams cut mid-way")
    parser.add_argument(
        "--disconnect-rate", type=float, default=0.05, help="share given up before the answer"
    )
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="allowed RSS growth ratio")
    parser.add_argument(
        "--max-duration", type=float, default=None, help="hard cap (default duration + 120 s)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny random base instead of the embedded model"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cfg = SoakConfig(
        duration_s=args.duration,
        warmup_s=args.warmup if args.warmup is not None else args.duration * 0.2,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        cancel_rate=args.cancel_rate,
        disconnect_rate=args.disconnect_rate,
        max_rss_growth=args.max_rss_growth,
        max_duration_s=args.max_duration or args.duration + 120,
        tiny=args.tiny,
        seed=args.seed,
    )
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lorayard-soak-") as tmp:
        result = run_soak(cfg, Path(tmp))
        if not result["passed"]:  # keep the evidence
            (args.out / "server.log").write_bytes((Path(tmp) / "server.log").read_bytes())
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    command = "python -m bench.soak " + shlex.join(argv if argv is not None else sys.argv[1:])
    _write_readme(args.out, result, command.strip())
    print(
        json.dumps({"passed": result["passed"], "checks": result["checks"], "rss": result["rss"]}, indent=2)
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
