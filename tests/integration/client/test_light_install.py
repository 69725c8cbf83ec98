"""The client as its own light distribution: ``pip install ./client`` in a venv without torch gives
``lorayard-client`` and ``python -m lorayard.client``, and both talk to a real server.

``make install`` builds that venv (``.venv-client``, what CI runs); on a checkout without it the
fixture builds one (pip, about a minute)."""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest
from lorayard.client import LorayardClient

REPO = Path(__file__).resolve().parents[3]
# What the server needs and a laptop running the client must not have to install.
SERVER_ONLY = {"torch", "transformers", "peft", "xgrammar", "bitsandbytes", "boto3", "fastapi", "lorayard"}


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory) -> Path:
    built = REPO / ".venv-client"
    if (built / ".installed").exists():
        return built
    folder = tmp_path_factory.mktemp("venv-client")
    venv.create(folder, with_pip=True)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(REPO / "client")], check=True, timeout=600)
    return folder


def _run(venv_dir: Path, *command: str, cwd: Path) -> str:
    # cwd outside the checkout: the repository's own lorayard/ must not shadow the installed one
    done = subprocess.run(
        [str(venv_dir / "bin" / command[0]), *command[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": str(venv_dir / "bin"), "NO_PROXY": "127.0.0.1,localhost", "HOME": str(cwd)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_light_venv_has_no_server_dependencies(light_venv, tmp_path):
    listing = json.loads(_run(light_venv, "python", "-m", "pip", "list", "--format", "json", cwd=tmp_path))
    installed = {package["name"].lower() for package in listing}
    assert "lorayard-client" in installed
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY
    probe = "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('lorayard.server'))"
    assert _run(light_venv, "python", "-c", probe, cwd=tmp_path).split() == ["None", "None"]


def test_the_light_cli_chats_lists_and_load_tests_a_real_server(light_venv, server, tmp_path):
    flags = ["--base-url", server.base_url, "--api-key", server.api_key]
    question = "Name a colour."
    answer = _run(
        light_venv, "lorayard-client", "chat", *flags, "--adapter", "alpha", "--no-stream",
        "--max-tokens", "8", "--temperature", "0", question, cwd=tmp_path,
    )  # fmt: skip
    with LorayardClient(server.base_url, api_key=server.api_key) as client:
        messages = [{"role": "user", "content": question}]
        expected = client.chat(messages, adapter="alpha", max_tokens=8, temperature=0)
    assert answer.strip() == expected.text.strip() and expected.text.strip()

    models = _run(light_venv, "python", "-m", "lorayard.client", "models", *flags, cwd=tmp_path)
    assert {"alpha", "beta"} <= set(models.split())

    out, plot = tmp_path / "load.json", tmp_path / "load.png"
    _run(
        light_venv, "lorayard-client", "loadtest", *flags, "--adapters", "alpha,beta", "--concurrency", "2",
        "--requests", "4", "--max-tokens", "4", "--out", str(out), "--plot", str(plot), cwd=tmp_path,
    )  # fmt: skip
    assert plot.stat().st_size > 0  # matplotlib, the client's own dependency, drew it
    assert json.loads(out.read_text())
