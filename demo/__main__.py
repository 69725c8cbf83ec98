"""``make demo``: train two demo adapters, publish them, serve them, query them side by side.

Every step is the product's own CLI or client, exactly what a user would run by hand:
``lorayard train --config ...`` twice, ``lorayard serve --adapters-dir ...`` (its log in a file the demo
names), and the client library against it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lorayard.client import LorayardClient
from rich.console import Console
from rich.table import Table

from lorayard.testing.server import start_server

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"persona": "lorayard/train/configs/persona.yaml", "pirate": "lorayard/train/configs/pirate.yaml"}
QUESTIONS = ["Who are you?", "What is the capital of Italy?", "How do I bake bread?"]

console = Console()


def _run(cmd: list[str]) -> None:
    console.rule(f"[bold]$ {' '.join(cmd)}")
    subprocess.run(cmd, cwd=REPO, check=True)


def train(adapters_dir: Path) -> None:
    for name, config in CONFIGS.items():
        _run(
            [
                sys.executable,
                "-m",
                "lorayard.train",
                "--config",
                config,
                "--name",
                name,
                "--adapters-dir",
                str(adapters_dir),
            ]
        )


def serve_and_query(adapters_dir: Path) -> None:
    log_path = Path(tempfile.mkdtemp(prefix="lorayard-demo-")) / "server.log"
    console.rule(f"[bold]$ lorayard serve --adapters-dir {adapters_dir}   (log: {log_path})")
    server = start_server(["--adapters-dir", str(adapters_dir)], log_path, timeout=120)
    try:
        client = LorayardClient(server.v1, timeout=120)
        console.print("models:", ", ".join(m.id for m in client.models()))
        table = Table(title="one server, one base model, three ways to answer (greedy)")
        table.add_column("question")
        for column in ("base", *CONFIGS):
            table.add_column(column)
        for question in QUESTIONS:
            messages = [{"role": "user", "content": question}]
            answers = [client.chat(messages, max_tokens=48, temperature=0).text]
            answers += [
                client.chat(messages, adapter=name, max_tokens=48, temperature=0).text for name in CONFIGS
            ]
            table.add_row(question, *answers)
        console.print(table)
        console.print("[bold]streaming from the pirate adapter:[/bold] ", end="")
        sea = [{"role": "user", "content": "Tell me about the sea."}]
        for delta in client.chat_stream(sea, adapter="pirate", max_tokens=48, temperature=0):
            console.print(delta, end="")
        console.print()
        client.close()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--adapters-dir", type=Path, default=Path(os.environ.get("LORAYARD_ADAPTERS_DIR", "adapters"))
    )
    parser.add_argument("--skip-training", action="store_true", help="serve what is already published")
    args = parser.parse_args()
    adapters_dir = args.adapters_dir.resolve()
    if not args.skip_training:
        train(adapters_dir)
    serve_and_query(adapters_dir)
    console.rule("[bold]done")
    for name in CONFIGS:
        latest = (adapters_dir / name / "LATEST").read_text().strip()
        console.print(f"{name}: {adapters_dir / name / latest}/ (manifest.json, eval.json, loss_curve.png)")
    console.print("serve them yourself: lorayard serve --adapters-dir", adapters_dir)


if __name__ == "__main__":
    main()
