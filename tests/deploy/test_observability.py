"""The Grafana dashboard, Prometheus and Grafana provisioning; yamllint over every YAML file."""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client import Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

from lorayard.server.metrics import ProtocolGauges, ServerMetrics

from .conftest import REPO, compose_config, run_tool, venv_tool

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "lorayard.json"


def test_yamllint_every_yaml_file():
    run_tool([venv_tool("yamllint"), "--strict", "."])


def _exposed_series() -> dict[str, set[str]]:
    """Series name -> label names, for every metric in the server's registry (histograms and counters
    expose _bucket/_sum/_count and _total)."""
    metrics = ServerMetrics.create()
    series: dict[str, set[str]] = {}
    # a protocol family's first gauge carries our name (the others, the endpoint picker's)
    wrapped = [v.gauges[:1] if isinstance(v, ProtocolGauges) else (v,) for v in vars(metrics).values()]
    for value in (metric for group in wrapped for metric in group):
        if not isinstance(value, MetricWrapperBase):
            continue
        labels = set(value._labelnames)
        name = value._name
        if isinstance(value, Histogram):
            series.update({f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels})
        elif isinstance(value, Counter):
            series[f"{name}_total"] = labels
        else:
            series[name] = labels
    return series


def _queries(dashboard: dict) -> list[str]:
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    return [t["expr"] for p in panels for t in p["targets"]]


def test_dashboard_queries_only_metrics_the_server_defines():
    dashboard = json.loads(DASHBOARD.read_text())
    series = _exposed_series()
    used = set()
    for expr in _queries(dashboard):
        for name in re.findall(r"\blorayard_[a-zA-Z0-9_:]+", expr):
            assert name in series, f"{name} is not defined in lorayard/server/metrics.py: {expr}"
            used.add(name)
        names = re.findall(r"\blorayard_[a-zA-Z0-9_:]+", expr)
        metric_labels = set().union(*(series[n] for n in names))
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in grouping.split(",")):
                assert label in metric_labels | {"instance", "job"}, f"no label {label!r} in {expr}"
    # every metric family is on the dashboard somewhere
    families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in series}
    assert {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used} == families


def test_dashboard_shows_per_adapter_latency_quantiles():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    for metric in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        for quantile in ("0.5", "0.99"):
            assert any(
                f"histogram_quantile({quantile}, sum by (adapter, le)" in q and metric in q for q in queries
            ), (metric, quantile)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    # the datasource is a variable: the same JSON works in compose and under kube-prometheus-stack
    assert all(p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for p in panels)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert "lorayard_requests_total" in variables["adapter"]["definition"]


def test_prometheus_scrapes_the_compose_server():
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    serve = compose_config("compose.yaml")["services"]["serve"]
    port = serve["environment"]["LORAYARD_PORT"]
    assert job["static_configs"][0]["targets"] == [f"serve:{port}"]


def test_grafana_provisioning_points_at_the_mounted_dashboard():
    services = compose_config("compose.yaml", profiles=("monitoring",))["services"]
    mounts = {m["target"]: REPO / m["source"] for m in services["grafana"]["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "lorayard.yaml").read_text())["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert any(p["target"] == 9090 for p in services["prometheus"]["ports"])
