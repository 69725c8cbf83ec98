"""k8s/: every overlay builds with kustomize and validates strictly; the manifests keep their promises."""

from __future__ import annotations

import json
import os
import re
import tomllib
from typing import Any

import jsonschema
import pytest
import yaml

from lorayard.train.__main__ import EXIT_CONFIG, EXIT_DATA, EXIT_NOT_BETTER, EXIT_SERVING_CHECK

from .conftest import (
    OVERLAYS,
    REPO,
    container,
    find,
    image_runtime,
    kustomize,
    validate_strictly,
)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay, overlay_builds, tmp_path):
    validate_strictly(overlay_builds[overlay], tmp_path)


def test_every_component_together_validates_strictly(all_components_build, tmp_path):
    validate_strictly(all_components_build, tmp_path)


def test_strict_validation_catches_a_typo(overlay_builds, tmp_path):
    """The check above can fail: an unknown field in a pod spec is refused."""
    broken = json.loads(json.dumps(overlay_builds["cpu"]))
    find(broken, "Deployment")["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(AssertionError, match="livenesProbe"):
        validate_strictly(broken, tmp_path)
    monitor = json.loads(json.dumps(find(overlay_builds["monitoring"], "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate_strictly([monitor], tmp_path)


# -- what the manifests promise ------------------------------------------------------------------------


def _pod(resource: dict[str, Any]) -> dict[str, Any]:
    if resource["kind"] == "CronJob":
        return resource["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return resource["spec"]["template"]["spec"]


def _env(spec: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in spec.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_locked_down(overlay, overlay_builds):
    uid = int(image_runtime("Dockerfile.serve").user.split(":")[0])
    for kind, name in (("Deployment", "serve"), ("Job", "train")):
        pod = _pod(find(overlay_builds[overlay], kind))
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid  # the image's USER
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        box = container(pod, name)
        assert box["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in box["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # the image's writable caches live there
        adapters = volumes[mounts["/adapters"]["name"]]
        assert adapters["persistentVolumeClaim"]["claimName"] == "lorayard-adapters"
        assert box["resources"]["requests"]["cpu"] and box["resources"]["limits"]["memory"]


def test_adapters_volume_is_shared_and_read_only_for_the_server(overlay_builds):
    resources = overlay_builds["cpu"]
    claim = find(resources, "PersistentVolumeClaim", "lorayard-adapters")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    serve_pod = _pod(find(resources, "Deployment"))
    serve_mounts = {m["mountPath"]: m for m in container(serve_pod, "serve")["volumeMounts"]}
    assert serve_mounts["/adapters"]["readOnly"] is True
    train_pod = _pod(find(resources, "Job"))
    train_mounts = {m["mountPath"]: m for m in container(train_pod, "train")["volumeMounts"]}
    assert not train_mounts["/adapters"].get("readOnly")
    assert train_mounts["/data"]["readOnly"] is True and train_mounts["/config"]["readOnly"] is True


def test_server_probes_drain_and_secret(overlay_builds):
    deployment = find(overlay_builds["cpu"], "Deployment")
    pod = _pod(deployment)
    serve = container(pod, "serve")
    healthcheck = image_runtime("Dockerfile.serve").healthcheck  # /ready, with the key when set
    assert serve["startupProbe"]["exec"]["command"] == healthcheck
    assert serve["readinessProbe"]["exec"]["command"] == healthcheck
    assert serve["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert serve["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    env = _env(serve)
    assert env["LORAYARD_API_KEY"]["secretKeyRef"]["optional"] is True
    # preStop sleep, then SIGTERM drains for LORAYARD_DRAIN_TIMEOUT: both must fit the grace period
    sleep = int(serve["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= sleep + float(env["LORAYARD_DRAIN_TIMEOUT"]) + 5
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_service_hpa_pdb_select_the_server(overlay_builds):
    resources = overlay_builds["monitoring"]
    deployment = find(resources, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find(resources, "Service")

    def selects(selector: dict[str, str]) -> bool:
        return selector.items() <= pod_labels.items()

    assert selects(service["spec"]["selector"])
    assert selects(find(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    hpa = find(resources, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lorayard-serve"}
    assert hpa["spec"]["scaleTargetRef"] == target
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    monitor = find(resources, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_training_job(overlay_builds):
    resources = overlay_builds["cpu"]
    job = find(resources, "Job")
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    # failures a retry cannot fix stop the Job at once: train_job's own exit codes
    fail_job = next(r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob")
    hopeless = {EXIT_CONFIG, EXIT_DATA, EXIT_NOT_BETTER, EXIT_SERVING_CHECK}
    assert set(fail_job["onExitCodes"]["values"]) == hopeless
    pod = _pod(job)
    train = container(pod, "train")
    assert train["args"][:2] == ["--config", "/config/train.yaml"]
    config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
    config_map = find(resources, "ConfigMap", "lorayard-train")
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]  # the hashed name
    assert "train.yaml" in config_map["data"]
    datasets = next(v for v in pod["volumes"] if v["name"] == "datasets")
    assert datasets["persistentVolumeClaim"]["claimName"] == "lorayard-datasets"


def test_retrain_cronjob_runs_the_jobs_pod(all_components_build):
    job_pod = _pod(find(all_components_build, "Job"))
    cron = find(all_components_build, "CronJob")
    cron_pod = _pod(cron)
    job_args = container(job_pod, "train").pop("args")
    cron_args = container(cron_pod, "train").pop("args")
    assert cron_pod == job_pod  # one pod definition, two schedules
    assert cron_args[: len(job_args)] == job_args and "--publish-if-better" in cron_args
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["suspend"] is False  # the retrain component turns it on
    assert {k: v for k, v in cron["spec"]["jobTemplate"]["spec"].items() if k != "template"} == {
        k: v for k, v in find(all_components_build, "Job")["spec"].items() if k != "template"
    }


def test_gpu_overlay_requests_gpus_and_cuda_images(overlay_builds, all_components_build):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for kind, name in (("Deployment", "serve"), ("Job", "train")):
        gpu_box = container(_pod(find(overlay_builds["gpu"], kind)), name)
        assert gpu_box["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert re.fullmatch(rf"lorayard-{name}:{re.escape(version)}-cu\d+", gpu_box["image"])
        cpu_box = container(_pod(find(overlay_builds["cpu"], kind)), name)
        assert "nvidia.com/gpu" not in cpu_box["resources"].get("limits", {})
        assert cpu_box["image"] == f"lorayard-{name}:{version}"
        # torch's thread pool follows the pod's CPU share, not the node's cores
        assert _env(cpu_box)["OMP_NUM_THREADS"] == cpu_box["resources"]["requests"]["cpu"]
    cron_box = container(_pod(find(all_components_build, "CronJob")), "train")
    assert cron_box["resources"]["limits"]["nvidia.com/gpu"] == 1
    for overlay in OVERLAYS:  # present everywhere, off unless asked for
        assert find(overlay_builds[overlay], "CronJob")["spec"]["suspend"] is True


def test_monitoring_ships_the_one_dashboard(overlay_builds):
    dashboard = find(overlay_builds["monitoring"], "ConfigMap", "lorayard-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    single_copy = REPO / "deploy" / "grafana" / "dashboards" / "lorayard.json"
    assert dashboard["data"]["lorayard.json"] == single_copy.read_text()
    assert not any(r["kind"] == "ServiceMonitor" for r in overlay_builds["cpu"] + overlay_builds["gpu"])


def test_readme_own_dataset_overlay(tmp_path):
    """The overlay docs/deploy.md tells users to write: it builds, validates and trains their config."""
    section = (REPO / "docs" / "deploy.md").read_text()
    folder = tmp_path / "my-lorayard"
    folder.mkdir()
    k8s = os.path.relpath(REPO / "k8s", folder)
    for name in ("train.yaml", "kustomization.yaml"):
        block = re.search(rf"cat > {re.escape(name)} <<'YAML'\n(.*?)\nYAML\n", section, flags=re.DOTALL)
        assert block, f"docs/deploy.md has no {name} heredoc"
        (folder / name).write_text(block.group(1).replace("../k8s", k8s) + "\n")
    resources = kustomize(folder)
    validate_strictly(resources, tmp_path)
    config_map = find(resources, "ConfigMap", "lorayard-train")
    assert yaml.safe_load(config_map["data"]["train.yaml"])["data"] == ["/data/support.jsonl"]
    for kind in ("Job", "CronJob"):
        pod = _pod(find(resources, kind))
        config = next(v for v in pod["volumes"] if v["name"] == "config")
        assert config["configMap"]["name"] == config_map["metadata"]["name"]
        assert container(pod, "train")["resources"]["limits"]["nvidia.com/gpu"] == 1


# -- the object-store overlay ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_build() -> list[dict[str, Any]]:
    return kustomize(REPO / "k8s" / "overlays" / "s3")


def test_s3_overlay_validates_strictly(s3_build, tmp_path):
    validate_strictly(s3_build, tmp_path)


def _quantity_gib(text: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi)", text).groups()
    return float(number) * units[unit]


def test_s3_overlay_needs_no_shared_volume_and_takes_credentials_from_the_standard_chain(s3_build):
    claims = [r for r in s3_build if r["kind"] == "PersistentVolumeClaim"]
    assert claims and all("ReadWriteMany" not in c["spec"]["accessModes"] for c in claims)
    assert not any(c["metadata"]["name"] == "lorayard-adapters" for c in claims)
    account = find(s3_build, "ServiceAccount", "lorayard-adapters")
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]  # IRSA
    for kind, name in (("Deployment", "serve"), ("Job", "train"), ("CronJob", "train")):
        pod = _pod(find(s3_build, kind))
        box = container(pod, name)
        env = _env(box)
        assert env["LORAYARD_ADAPTERS_DIR"].startswith("s3://")
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
            ref = env[variable]["secretKeyRef"]  # never a literal value in the manifest
            assert ref["name"] == "lorayard-s3" and ref["optional"] is True  # absent: IRSA / the chain
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False  # IRSA projects its own token
        assert "/adapters" not in {m["mountPath"] for m in box["volumeMounts"]}
        assert not any(
            v.get("persistentVolumeClaim", {}).get("claimName") == "lorayard-adapters" for v in pod["volumes"]
        )
        assert box["securityContext"]["readOnlyRootFilesystem"] is True
    serve_pod = _pod(find(s3_build, "Deployment"))
    serve_env = _env(container(serve_pod, "serve"))
    volumes = {v["name"]: v for v in serve_pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(serve_pod, "serve")["volumeMounts"]}
    cache = volumes[mounts[serve_env["LORAYARD_ADAPTER_CACHE_DIR"]]]["emptyDir"]
    assert float(serve_env["LORAYARD_ADAPTER_CACHE_GB"]) < _quantity_gib(cache["sizeLimit"])
