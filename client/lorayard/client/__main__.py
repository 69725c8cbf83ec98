"""``python -m lorayard.client {chat,complete,models,load-adapter,unload-adapter,health,loadtest}``.

Also installed as the console script ``lorayard-client``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lorayard.client.base import DEFAULT_BASE_URL, DEFAULT_TIMEOUT_S, ENV_API_KEY, ENV_BASE_URL
from lorayard.client.client import LorayardClient
from lorayard.client.errors import APIStatusError, LorayardError
from lorayard.client.loadtest import (
    Breakdown,
    LoadTestConfig,
    LoadTestResult,
    PromptsFileError,
    RequestRecord,
    load_prompts,
    run_loadtest,
)
from lorayard.client.stats import LatencyStats
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

_out = Console()
_err = Console(stderr=True)


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url",
        default=None,
        help=f"server URL ending in /v1 (default ${ENV_BASE_URL} or {DEFAULT_BASE_URL})",
    )
    parser.add_argument("--api-key", default=None, help=f"bearer token (default ${ENV_API_KEY})")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds per request (default {DEFAULT_TIMEOUT_S:g})",
    )


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default=None, help="adapter name or name@vN (default: the base model)")
    parser.add_argument("--model", default=None, help="model id to send (default: the adapter, or none)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-stream", action="store_true", help="wait for the whole answer")


def build_parser(prog: str = "lorayard-client") -> argparse.ArgumentParser:
    """The client's argument parser; ``prog``: the command its usage names (``lorayard`` when the
    project's one command runs it)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Talk to a LoRAyard (or any OpenAI-compatible) server, or load-test it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    chat = commands.add_parser("chat", help="send one chat message and stream the answer")
    _add_connection_flags(chat)
    _add_generation_flags(chat)
    chat.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    chat.add_argument("message")

    complete = commands.add_parser("complete", help="complete a raw prompt (no chat template)")
    _add_connection_flags(complete)
    _add_generation_flags(complete)
    complete.add_argument("prompt")

    models = commands.add_parser("models", help="list the base model and the adapters")
    _add_connection_flags(models)

    load = commands.add_parser("load-adapter", help="load an adapter into the server")
    _add_connection_flags(load)
    load.add_argument("name")
    load.add_argument("path", nargs="?", default=None, help="folder inside the server's adapters volume")

    unload = commands.add_parser("unload-adapter", help="evict an adapter from the server's memory")
    _add_connection_flags(unload)
    unload.add_argument("name")

    health = commands.add_parser("health", help="liveness and readiness")
    _add_connection_flags(health)

    loadtest = commands.add_parser(
        "loadtest",
        help="load test: concurrent requests over several adapters, latency/throughput report",
        description="Closed loop (--concurrency) or Poisson arrivals (--rate), bounded by --requests "
        "and/or --duration and always by --max-duration.",
    )
    _add_connection_flags(loadtest)
    loadtest.add_argument(
        "--adapters", default="", help="comma-separated adapter refs (default: the bare base model)"
    )
    loadtest.add_argument("--weights", default=None, help="comma-separated relative shares, one per adapter")
    mode = loadtest.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", type=int, help="requests in flight at all times (closed loop)")
    mode.add_argument("--rate", type=float, help="mean arrivals per second (Poisson, open loop)")
    loadtest.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    loadtest.add_argument("--duration", type=float, default=None, help="stop issuing after this many seconds")
    loadtest.add_argument(
        "--max-duration",
        type=float,
        default=None,
        help="hard cap; cancels in-flight (default 600 s or duration+60)",
    )
    loadtest.add_argument("--max-tokens", type=int, required=True)
    loadtest.add_argument("--temperature", type=float, default=0.0)
    loadtest.add_argument(
        "--prompts", type=Path, default=None, help="text (one per line) or JSONL prompt/messages"
    )
    loadtest.add_argument("--endpoint", choices=["chat", "completion"], default="chat")
    loadtest.add_argument(
        "--stream", action="store_true", help="stream (measures TTFT and inter-token latency)"
    )
    loadtest.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    loadtest.add_argument("--retries", type=int, default=0, help="retries on 429/503 (default 0: no retries)")
    loadtest.add_argument("--seed", type=int, default=0)
    loadtest.add_argument("--out", type=Path, required=True, help="results JSON")
    loadtest.add_argument("--plot", type=Path, default=None, help="results PNG")
    return parser


def _client(args: argparse.Namespace) -> LorayardClient:
    return LorayardClient(args.base_url, api_key=args.api_key, timeout=args.timeout)


def _sampling(args: argparse.Namespace) -> dict[str, object]:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}


def _generate(args: argparse.Namespace, *, chat: bool) -> int:
    messages = []
    if chat:
        if args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": args.message})
    with _client(args) as client:
        kwargs = {"adapter": args.adapter, "model": args.model, **_sampling(args)}
        if args.no_stream:
            result = client.chat(messages, **kwargs) if chat else client.complete(args.prompt, **kwargs)
            sys.stdout.write(result.text)
            usage, finish = result.usage, result.finish_reason
        else:
            stream = (
                client.chat_stream(messages, **kwargs)
                if chat
                else client.complete_stream(args.prompt, **kwargs)
            )
            with stream:
                for delta in stream:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            usage, finish = stream.usage, stream.finish_reason
    sys.stdout.write("\n")
    sys.stdout.flush()  # before the usage line on stderr, so a terminal shows them in order
    if usage is not None:
        tokens = f"{usage.prompt_tokens} prompt + {usage.completion_tokens} output tokens"
        _err.print(f"[dim]{tokens}, finish: {finish}[/dim]")
    return 0


def _models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models()
    table = Table(title=f"models at {client.base_url}")
    show_len = any(model.max_model_len for model in models)
    table.add_column("id", no_wrap=True)
    table.add_column("kind")
    table.add_column("parent")
    if show_len:
        table.add_column("max_model_len", justify="right")
    table.add_column("details")
    for model in models:
        # Server-specific extras, minus the empty ones, so the table stays readable.
        details = ", ".join(
            f"{key}={value}" for key, value in model.extra_fields.items() if value not in (None, [], {}, "")
        )
        cells = [model.id, "adapter" if model.is_adapter else "base", model.parent or ""]
        if show_len:
            cells.append(str(model.max_model_len or ""))
        table.add_row(*cells, details)
    _out.print(table)
    return 0


def _adapter_operation(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.command == "load-adapter":
            result = client.load_adapter(args.name, args.path)
        else:
            result = client.unload_adapter(args.name)
    _out.print(result.message or result.fields or "ok")
    return 0


def _health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        healthy, ready = client.health(), client.ready()
    _out.print(f"health: {'ok' if healthy else 'failing'}  ready: {'yes' if ready else 'no'}")
    return 0 if healthy and ready else 1


def _split(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def loadtest_config(args: argparse.Namespace) -> LoadTestConfig:
    """Flags -> :class:`LoadTestConfig` (raises ``ValueError`` naming the flag)."""
    adapters: list[str | None] = list(_split(args.adapters)) or [None]
    try:
        weights = [float(w) for w in _split(args.weights)] or None
    except ValueError as exc:
        raise ValueError(f"--weights: {exc}") from exc
    return LoadTestConfig(
        base_url=args.base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL,
        adapters=adapters,
        weights=weights,
        concurrency=args.concurrency,
        rate=args.rate,
        requests=args.requests,
        duration_s=args.duration,
        max_duration_s=args.max_duration,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        stream=args.stream,
        ignore_eos=args.ignore_eos,
        endpoint=args.endpoint,
        prompts_file=str(args.prompts) if args.prompts else None,
        seed=args.seed,
        timeout_s=args.timeout,
        retries=args.retries,
    )


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(result: LoadTestResult) -> Table:
    """The end-of-run summary: one row per measure, a column for the whole run and one per adapter."""
    table = Table(title=f"load test: {result.duration_s:.1f} s, stopped by {result.stopped_by}")
    parts: dict[str, Breakdown | LoadTestResult] = {"all": result, **result.per_adapter}
    table.add_column("", no_wrap=True)
    for label in parts:
        table.add_column(label, justify="right", style="bold" if label == "all" else None)

    def triple(stats: LatencyStats) -> str:
        return "/".join(
            _fmt(v, 1 if v is not None and v < 100 else 0) for v in (stats.p50, stats.p90, stats.p99)
        )

    rows = {
        "completed": lambda p: f"{p.completed}/{p.requests}",
        "errors": lambda p: " ".join(f"{k}:{v}" for k, v in p.errors.items()) or "0",
        "requests/s": lambda p: _fmt(p.requests_per_s, 2),
        "output tokens/s": lambda p: _fmt(p.output_tokens_per_s, 1),
        "TTFT ms p50/90/99": lambda p: triple(p.ttft_ms),
        "ITL ms p50/90/99": lambda p: triple(p.itl_ms),
        "e2e ms p50/90/99": lambda p: triple(p.e2e_ms),
        "e2e ms mean": lambda p: _fmt(p.e2e_ms.mean),
    }
    for name, cell in rows.items():
        table.add_row(name, *(cell(part) for part in parts.values()))
    return table


def _loadtest(args: argparse.Namespace) -> int:
    from lorayard.client.plot import plot_loadtest  # matplotlib only when a run finishes

    try:
        config = loadtest_config(args)
        prompts = load_prompts(args.prompts) if args.prompts else None
    except (ValidationError, ValueError, PromptsFileError) as exc:
        _err.print(f"[red]error:[/red] {exc}")
        return 2
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]loadtest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rps]:.2f} req/s"),
        TextColumn("{task.fields[tps]:.1f} tok/s"),
        TextColumn("[red]errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=_err,
    )
    started = time.perf_counter()
    completed = errors = tokens = 0
    with progress:
        task = progress.add_task("loadtest", total=config.requests, rps=0.0, tps=0.0, errors=0)

        def on_record(record: RequestRecord) -> None:
            nonlocal completed, errors, tokens
            if record.ok:
                completed += 1
                tokens += record.output_tokens or 0
            else:
                errors += 1
            elapsed = max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=1, rps=completed / elapsed, tps=tokens / elapsed, errors=errors)

        result = run_loadtest(config, api_key=args.api_key, prompts=prompts, on_record=on_record)
    _out.print(results_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    _err.print(f"results: {args.out}")
    if args.plot:
        plot_loadtest(result, args.plot)
        _err.print(f"plot: {args.plot}")
    return 0 if result.completed else 1


_COMMANDS = {
    "chat": lambda args: _generate(args, chat=True),
    "complete": lambda args: _generate(args, chat=False),
    "models": _models,
    "load-adapter": _adapter_operation,
    "unload-adapter": _adapter_operation,
    "health": _health,
    "loadtest": _loadtest,
}


def main(argv: Sequence[str] | None = None, prog: str = "lorayard-client") -> int:
    """Entry point of ``python -m lorayard.client``, ``lorayard-client`` and ``lorayard chat|loadtest``."""
    args = build_parser(prog).parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except APIStatusError as exc:
        kind = f" ({exc.type})" if exc.type else ""
        _err.print(f"[red]error {exc.status_code}{kind}:[/red] {exc.message}")
    except LorayardError as exc:
        _err.print(f"[red]error:[/red] {exc}")
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
