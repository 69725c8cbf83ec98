"""What a result records as its command: something a user can type on their own machine."""

from __future__ import annotations

from pathlib import Path

from bench.record import portable_args

REPO = Path(__file__).resolve().parents[3]


def test_paths_outside_the_repo_become_shell_variables(tmp_path):
    argv = ["--llama-cpp-src", str(tmp_path / "llama.cpp"), "--quick"]
    assert portable_args(argv) == ["--llama-cpp-src", '"$LLAMA_CPP_SRC"', "--quick"]


def test_repo_paths_and_plain_values_stay_as_typed():
    inside = str(REPO / "build" / "out")
    argv = ["--out", inside, "--device", "cuda", "--prompt", "two words"]
    assert portable_args(argv) == ["--out", inside, "--device", "cuda", "--prompt", "'two words'"]
