"""k8s/components/distributed-training: the overlay builds and validates strictly (Kubeflow Trainer's
TrainJob CRD schema, vendored), replaces the single-pod Job, and its pods run the job as the Job's do:
torchrun with --fsdp on several GPU nodes, the same volumes, config, image and locked-down pods."""

from __future__ import annotations

from typing import Any

import pytest

from lorayard.train.__main__ import _train_parser

from .conftest import REPO, assert_schema_refuses_typo, container, find, kustomize, validate_strictly


@pytest.fixture(scope="module")
def distributed() -> list[dict[str, Any]]:
    return kustomize(REPO / "k8s" / "overlays" / "distributed-training")


@pytest.fixture(scope="module")
def single_node() -> list[dict[str, Any]]:
    return kustomize(REPO / "k8s" / "overlays" / "gpu")


def _node_pod(train_job: dict[str, Any]) -> dict[str, Any]:
    """The pod spec the TrainJob patches into the runtime's `node` job."""
    (patch,) = train_job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"  # the replicated job of the torch-distributed runtime
    return node["template"]["spec"]["template"]["spec"]


def test_the_distributed_overlay_validates_strictly(distributed, tmp_path):
    assert "TrainJob" in {r["kind"] for r in distributed}
    validate_strictly(distributed, tmp_path)


@pytest.mark.parametrize(
    ("path", "typo"),
    [
        (("spec", "trainer"), "numProcsPerNode"),
        (("spec", "runtimeRef"), "namespace"),
        (("spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec"), "replicatedJob"),
    ],
)
def test_the_vendored_trainjob_schema_refuses_a_typo(distributed, path, typo, tmp_path):
    assert_schema_refuses_typo(distributed, "TrainJob", path, typo, tmp_path)


def test_the_trainjob_replaces_the_job_and_trains_with_fsdp_across_nodes(distributed):
    assert not [r for r in distributed if r["kind"] == "Job"]  # one run publishes, not two
    job = find(distributed, "TrainJob")
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] >= 2
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == trainer["numProcPerNode"]
    assert trainer["command"] == ["torchrun", "-m", "lorayard.train"]
    args = trainer["args"]
    assert "--fsdp" in args and "--resume" not in args  # the job refuses --resume with fsdp
    parsed = _train_parser().parse_args(args)  # flags the job knows, the config it is mounted with
    assert parsed.fsdp is True and str(parsed.config) == "/config/train.yaml"
    assert {e["name"]: e["value"] for e in trainer["env"]}["LORAYARD_ADAPTERS_DIR"] == "/adapters"


def test_the_trainjob_pods_mount_what_the_job_mounts(distributed, single_node):
    job_pod = find(single_node, "Job", "lorayard-train")["spec"]["template"]["spec"]
    node_pod = _node_pod(find(distributed, "TrainJob"))
    # the same claims and ConfigMap (its generated, hashed name), at the same paths
    train, node = container(job_pod, "train"), container(node_pod, "node")
    job_volumes = {v["name"]: v for v in job_pod["volumes"]}
    node_volumes = {v["name"]: v for v in node_pod["volumes"]}
    for mount in train["volumeMounts"]:
        twin = next(m for m in node["volumeMounts"] if m["mountPath"] == mount["mountPath"])
        assert twin.get("readOnly") == mount.get("readOnly")
        theirs, ours = job_volumes[mount["name"]], node_volumes[twin["name"]]
        for source in ("persistentVolumeClaim", "configMap"):
            assert theirs.get(source) == ours.get(source)
    config_map = find(distributed, "ConfigMap", "lorayard-train")
    assert node_volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    adapters = find(distributed, "PersistentVolumeClaim", "lorayard-adapters")
    assert adapters["spec"]["accessModes"] == ["ReadWriteMany"]  # every node writes checkpoints
    # NCCL needs more shared memory than a container's default 64 MiB
    shm = next(m for m in node["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert node_volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    # locked down as the Job's pod, on GPU nodes, with the CUDA training image
    assert node_pod["securityContext"] == job_pod["securityContext"]
    assert node["securityContext"] == train["securityContext"]
    assert node_pod["tolerations"] == job_pod["tolerations"]
    assert find(distributed, "TrainJob")["spec"]["trainer"]["image"] == train["image"]
