"""Fuzz the running server with schemathesis against its own /openapi.json: no 500s, no hangs.

Bounded: a tiny-base server (generation is milliseconds), a few examples per operation, a per-request
timeout and a hard wall-clock limit on the whole run. Offline: it only talks to 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import start_server

MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzz_server(tiny_base_dir, tmp_path_factory, tiny_adapter_source):
    from .conftest import copy_folder

    root = tmp_path_factory.mktemp("fuzz")
    copy_folder(tiny_adapter_source, root / "adapters" / "ok")
    server = start_server(
        [
            *("--adapters-dir", str(root / "adapters"), "--base-model", str(tiny_base_dir)),
            # Small limits keep every generated request cheap; the limits themselves are fuzzed.
            *("--max-model-len", "256", "--max-tokens-limit", "16", "--max-n", "2"),
        ],
        root / "server.log",
    )
    yield server
    server.stop()


def test_schemathesis_finds_no_server_error(fuzz_server, tmp_path: Path):
    schema = fuzz_server.base_url + "/openapi.json"
    assert httpx.get(schema).status_code == 200
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        schema,
        *("--checks", "not_a_server_error"),
        *("--max-examples", str(MAX_EXAMPLES)),
        *("--request-timeout", "20"),
        *("--phases", "examples,coverage,fuzzing"),
        *("--seed", "1"),
        *("--generation-database", "none"),
        "--no-color",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_PROXY": "127.0.0.1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=tmp_path, env=env)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " 500 " not in fuzz_server.log(), "the server answered 500:\n" + fuzz_server.log()[-4000:]
    assert fuzz_server.process.poll() is None, "the server died under fuzzing"
