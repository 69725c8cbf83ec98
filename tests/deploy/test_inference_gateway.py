"""k8s/components/inference-gateway and queue-autoscaling: the routed overlay builds and validates
strictly (the extension's and the Gateway API's CRD schemas, vendored), the pool, its picker and the
route point at each other, the picker reads metrics the server publishes, and the HPA scales on queue
depth through the Prometheus adapter's rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lorayard.server.metrics import PICKER_ALIASES, ServerMetrics

from .conftest import REPO, assert_schema_refuses_typo, container, find, kustomize, validate_strictly

COMPONENT = REPO / "k8s" / "components" / "inference-gateway"
ADAPTER_VALUES = REPO / "k8s" / "components" / "queue-autoscaling" / "prometheus-adapter-values.yaml"
PICKER_DEFAULT_METRICS = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:gpu_cache_usage_perc",
    "vllm:kv_cache_usage_perc",
    "vllm:lora_requests_info",
    "vllm:cache_config_info",
)
"""The endpoint picker's default metric names (cmd/epp: its --*-metric flags' defaults, vLLM's names
before and after vLLM renamed its KV-cache gauge); since v1.5 the flags are refused if set."""


@pytest.fixture(scope="module")
def routed() -> list[dict[str, Any]]:
    return kustomize(REPO / "k8s" / "overlays" / "inference-gateway")


def _deployment(resources: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return find(resources, "Deployment", name)


def _args(box: dict[str, Any]) -> dict[str, str]:
    args = box["args"]
    return {flag: value for flag, value in zip(args[::2], args[1::2], strict=True)}


def test_the_routed_overlay_validates_strictly(routed, tmp_path):
    kinds = {r["kind"] for r in routed}
    assert {"InferencePool", "Gateway", "HTTPRoute", "ServiceMonitor", "HorizontalPodAutoscaler"} <= kinds
    validate_strictly(routed, tmp_path)


@pytest.mark.parametrize(
    ("kind", "path", "typo"),
    [
        ("InferencePool", ("spec",), "targetPortNumber"),  # the pre-v1 field name
        ("InferencePool", ("spec", "endpointPickerRef"), "portNumber"),
        ("HTTPRoute", ("spec", "rules", 0, "backendRefs", 0), "weigth"),
        ("Gateway", ("spec", "listeners", 0), "hostnme"),
    ],
)
def test_the_vendored_crd_schemas_refuse_a_typo(routed, kind, path, typo, tmp_path):
    assert_schema_refuses_typo(routed, kind, path, typo, tmp_path)


def test_the_pool_selects_the_servers_and_names_its_picker(routed):
    pool = find(routed, "InferencePool")
    server = _deployment(routed, "lorayard-serve")
    pod_labels = server["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    serve_ports = container(server["spec"]["template"]["spec"], "serve")["ports"]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [p["containerPort"] for p in serve_ports]
    # the picker's Service, on the port the pool names, in front of the picker's pods
    ref = pool["spec"]["endpointPickerRef"]
    service = find(routed, "Service", ref["name"])
    picker = _deployment(routed, "lorayard-epp")
    assert service["spec"]["selector"].items() <= picker["spec"]["template"]["metadata"]["labels"].items()
    port = next(p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"])
    assert port["appProtocol"] == "http2"  # Envoy's ext-proc is gRPC
    epp = container(picker["spec"]["template"]["spec"], "epp")
    args = _args(epp)
    assert args["--pool-name"] == pool["metadata"]["name"]
    assert args["--pool-namespace"] == pool["metadata"]["namespace"]
    assert {p["containerPort"] for p in epp["ports"]} >= {
        int(args["--grpc-port"]),
        int(args["--grpc-health-port"]),
    }
    # the route sends the API to the pool through the Gateway
    route, gateway = find(routed, "HTTPRoute"), find(routed, "Gateway")
    assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        pool["apiVersion"].split("/")[0],
        "InferencePool",
        pool["metadata"]["name"],
    )


def test_the_picker_reads_what_the_server_publishes(routed):
    picker = _deployment(routed, "lorayard-epp")
    epp = container(picker["spec"]["template"]["spec"], "epp")
    assert not any(a.endswith("-metric") for a in epp["args"])  # defaults: refused if set since v1.5
    published = {alias for aliases in PICKER_ALIASES.values() for alias in aliases}
    assert set(PICKER_DEFAULT_METRICS) <= published
    # /metrics is scraped without the API key: the server must not put it behind one
    server = container(_deployment(routed, "lorayard-serve")["spec"]["template"]["spec"], "serve")
    assert "LORAYARD_METRICS_PUBLIC" not in {e["name"] for e in server.get("env", [])}
    # the config file it is told to read is the mounted ConfigMap, with every scorer weighted
    mount = next(m for m in epp["volumeMounts"] if _args(epp)["--config-file"].startswith(m["mountPath"]))
    volume = next(v for v in picker["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = find(routed, "ConfigMap", "lorayard-epp-config")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    config = yaml.safe_load(config_map["data"][Path(_args(epp)["--config-file"]).name])
    types = {p["type"] for p in config["plugins"]}
    assert {
        "queue-scorer",
        "kv-cache-utilization-scorer",
        "prefix-cache-scorer",
        "lora-affinity-scorer",
    } <= types
    (profile,) = config["schedulingProfiles"]
    weights = {p["pluginRef"]: p.get("weight") for p in profile["plugins"]}
    assert all(weights[t] for t in types if t.endswith("-scorer"))


def test_the_picker_may_read_the_pool_and_its_pods_only(routed):
    picker = _deployment(routed, "lorayard-epp")
    account = picker["spec"]["template"]["spec"]["serviceAccountName"]
    binding = find(routed, "RoleBinding", "lorayard-epp")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "lorayard"}]
    role = find(routed, "Role", binding["roleRef"]["name"])
    pool_group = find(routed, "InferencePool")["apiVersion"].split("/")[0]
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {(pool_group, "inferencepools"), ("", "pods")} <= granted
    assert all(set(rule["verbs"]) <= {"get", "watch", "list"} for rule in role["rules"])
    pod = picker["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container(pod, "epp")["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_hpa_scales_on_queue_depth_per_replica(routed):
    hpa = find(routed, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]  # no CPU target left
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    series = rule["seriesQuery"].split("{")[0]
    assert series == ServerMetrics.create().waiting.gauges[0]._name
    assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]
