"""Dockerfile.train / Dockerfile.serve: lint, pins, non-root, the shared builder, the build context."""

from __future__ import annotations

import re
import runpy
import shlex
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from .conftest import (
    DOCKERFILES,
    REPO,
    VLLM_DOCKERFILE,
    dockerfile_instructions,
    image_runtime,
    run_tool,
    venv_tool,
)

lock = runpy.run_path(str(REPO / "deploy" / "lock_constraints.py"))


@pytest.mark.parametrize("dockerfile", [*DOCKERFILES, VLLM_DOCKERFILE])
def test_hadolint_clean(dockerfile):
    run_tool([venv_tool("hadolint"), "--failure-threshold", "info", dockerfile])


def _shared_part(dockerfile: str) -> str:
    """From the base-image ARG to the runtime stage's WORKDIR: the builder and the runtime base."""
    text = (REPO / dockerfile).read_text()
    start = text.index("ARG PYTHON_IMAGE")
    end = text.index("WORKDIR /home/lorayard\n", text.index("USER "))
    return text[start:end]


def test_builder_and_runtime_base_identical_in_both_images():
    """Same instructions -> one set of cached layers for both images, and no drift between them."""
    train, serve = (_shared_part(d) for d in DOCKERFILES)
    assert train == serve


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_pinned_slim_python_base_and_torch(dockerfile):
    instructions = dockerfile_instructions(REPO / dockerfile)
    args = dict(
        rest.partition("=")[::2] for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    assert all(rest.split()[0] == "${PYTHON_IMAGE}" for keyword, rest in instructions if keyword == "FROM")
    # the image's torch is the one the suite runs on
    assert Version(args["TORCH_VERSION"]) == Version(Version(metadata.version("torch")).base_version)
    assert args["TORCH_VARIANT"] == "cpu"  # CPU by default; cu128 etc. by --build-arg


@pytest.mark.parametrize("dockerfile", [*DOCKERFILES, VLLM_DOCKERFILE])
def test_every_pip_install_is_pinned(dockerfile):
    for keyword, rest in dockerfile_instructions(REPO / dockerfile):
        if keyword != "RUN":
            continue
        for command in rest.split("&&"):
            if not command.strip().startswith("pip install"):
                continue
            words = shlex.split(command)
            packages = [w for w in words[2:] if not w.startswith("-")]
            options = [w for w in words[2:] if w.startswith("-")]
            if "-r" in options:  # pyproject's ranges, under the constraints file
                assert "-c" in options, command
                continue
            for package in packages:
                if package in {"constraints.txt", "requirements.txt"} or package.startswith("https://"):
                    continue
                # the project itself (no deps), or an exact pin
                assert (package == "." and "--no-deps" in options) or "==" in package, command


@pytest.mark.parametrize("dockerfile", [*DOCKERFILES, VLLM_DOCKERFILE])
def test_runtime_is_non_root_with_the_volume_and_cache_paths(dockerfile):
    runtime = image_runtime(dockerfile)
    uid, _, gid = runtime.user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()  # numeric: runAsNonRoot can verify it
    assert runtime.env["LORAYARD_ADAPTERS_DIR"] == "/adapters"
    # the builder converts the base model into the same cache the runtime reads
    instructions = dockerfile_instructions(REPO / dockerfile)
    builder_env = "".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert builder_env.count("LORAYARD_CACHE=/opt/lorayard/cache") == 2
    assert runtime.env["LORAYARD_CACHE"] == "/opt/lorayard/cache"
    assert "lorayard.base_model --prepare" in (REPO / dockerfile).read_text()
    # writable caches live in /tmp (an emptyDir under readOnlyRootFilesystem)
    for variable in ("HF_HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
        assert runtime.env[variable].startswith("/tmp/")


def test_entrypoints():
    train, serve = image_runtime("Dockerfile.train"), image_runtime("Dockerfile.serve")
    assert train.entrypoint == ["lorayard", "train"] and not train.cmd  # args pass through
    assert serve.entrypoint == ["lorayard", "serve"]
    assert serve.exposed == [serve.env["LORAYARD_PORT"]] == ["8000"]
    assert serve.env["LORAYARD_HOST"] == "0.0.0.0"
    assert serve.env["LORAYARD_BASE_URL"] == "http://127.0.0.1:8000/v1"  # what the health probe calls
    assert serve.healthcheck == ["python", "-m", "lorayard.client", "health", "--timeout", "4"]


# -- the build context ---------------------------------------------------------------------------------


def _dockerignore_regexes() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore patterns as (negated, regex), matching the way Docker does for these patterns."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rules.append((negated, re.compile(regex)))
    return rules


def _in_context(relative: str) -> bool:
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # a pattern on a parent applies
    included = True
    for negated, regex in _dockerignore_regexes():
        if any(regex.fullmatch(c) for c in candidates):
            included = negated
    return included


def _copied_sources() -> set[str]:
    sources = set()
    for dockerfile in (*DOCKERFILES, VLLM_DOCKERFILE):
        for keyword, rest in dockerfile_instructions(REPO / dockerfile):
            if keyword == "COPY" and "--from" not in rest:
                sources.update(s.rstrip("/") for s in rest.split()[:-1])
    return sources


def test_dockerignore_lets_in_what_the_images_copy():
    for source in _copied_sources():
        path = REPO / source
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        files += [] if path.is_file() else list(path.rglob("*.jsonl")) + list(path.rglob("*.yaml"))
        assert files, f"COPY {source}: nothing there"
        for file in files:
            assert _in_context(file.relative_to(REPO).as_posix()), f"{file} is excluded by .dockerignore"


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        ".venv/bin/python",
        ".git/config",
        "adapters/x/v1/manifest.json",
        "data/a.jsonl",
        "tests/conftest.py",
        "lorayard/server/__pycache__/app.cpython-311.pyc",
        "k8s/base/serve.yaml",
    ],
)
def test_dockerignore_keeps_out_secrets_and_local_state(path):
    assert not _in_context(path)


# -- pinned dependencies -------------------------------------------------------------------------------


def test_constraints_pin_every_runtime_dependency_within_pyproject_ranges():
    pins = lock["read_pins"]()
    for requirement in lock["runtime_requirements"]():
        name = lock["canonical"](requirement.name)
        if lock["UNPINNED"].match(name):
            continue
        assert name in pins, f"{name} is not in deploy/constraints.txt: run deploy/lock_constraints.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"deploy/constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )


def test_constraints_file_is_what_the_generator_writes():
    text = (REPO / "deploy" / "constraints.txt").read_text()
    assert text == lock["render"](lock["read_pins"]())  # sorted, one exact pin a line
    for name in lock["read_pins"]():
        Requirement(name)  # a valid project name
    assert isinstance(lock["CONSTRAINTS"], Path)
