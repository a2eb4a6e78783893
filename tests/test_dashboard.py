"""The shipped Grafana dashboard and its Prometheus/Grafana provisioning, checked as files: the dashboard only
queries metrics that ``monitor.metrics`` exports, through the provisioned datasource, and the provisioning
points where docker-compose mounts things. No network, no Grafana; promtool when it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from monitor import metrics
from monitor.dashboard import DASHBOARD_PATH, dashboard_queries, iter_panels, load_dashboard, metric_names_in

MONITOR = Path(metrics.__file__).resolve().parent
DATASOURCE_UID = "swarm-prometheus"
DASHBOARDS_DIR = "/var/lib/grafana/dashboards"
SPECS = {spec.name: spec for spec in metrics.ALL + metrics.PER_PEER}  # counters listed with their _total names


def queried_panels() -> list[dict[str, Any]]:
    return [panel for panel in iter_panels(load_dashboard()) if panel.get("type") != "row"]


def datasources(node: Any) -> Iterator[Any]:
    """Every value of a "datasource" key anywhere in the dashboard JSON."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasources(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasources(value)


def test_dashboard_loads_with_unique_panel_ids():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 39
    ids = [panel["id"] for panel in iter_panels(dashboard)]
    assert len(ids) == len(set(ids)), ids


def test_every_panel_has_a_query():
    for panel in queried_panels():
        assert panel.get("targets"), f"panel {panel.get('title')!r} has no targets"
        assert all(target.get("expr", "").strip() for target in panel["targets"]), panel["title"]


def test_queries_use_only_exported_metrics():
    queries = dashboard_queries()
    assert queries
    for title, expr in queries:
        used = metric_names_in(expr)
        assert used, f"{title!r}: {expr!r} reads no swarm_* metric"
        assert used <= SPECS.keys(), f"{title!r}: {sorted(used - SPECS.keys())} not in monitor/metrics.py"


def test_legends_only_name_labels_the_metrics_have():
    for panel in queried_panels():
        for target in panel["targets"]:
            labels = {"job", "instance"}.union(*(SPECS[name].labels for name in metric_names_in(target["expr"])))
            used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert used <= labels, f"{panel['title']!r}: legend uses {sorted(used - labels)}"


def test_ref_ids_unique_per_panel():
    for panel in queried_panels():
        ref_ids = [target.get("refId") for target in panel["targets"]]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), (panel["title"], ref_ids)


def test_every_datasource_is_the_provisioned_one():
    found = list(datasources(load_dashboard()))
    assert len(found) >= sum(1 + len(panel["targets"]) for panel in queried_panels())
    for datasource in found:
        assert isinstance(datasource, dict) and datasource.get("uid") == DATASOURCE_UID, datasource


def test_metric_names_in():
    assert metric_names_in("rate(swarm_averaging_rounds_total[1m]) * 60") == {"swarm_averaging_rounds_total"}
    assert metric_names_in('swarm_loss{stat="median"} / on() swarm_peers') == {"swarm_loss", "swarm_peers"}
    assert metric_names_in('label_replace(up, "x", "swarm_step", "", "")') == set()  # strings are not names
    assert metric_names_in("swarm_loss2 + $swarm_var + my_swarm_step") == {"swarm_loss2"}  # typos stay whole


def test_dashboard_queries_include_collapsed_rows():
    dashboard = {"panels": [
        {"type": "timeseries", "title": "top", "targets": [{"refId": "A", "expr": "swarm_step"}]},
        {"type": "row", "title": "more", "collapsed": True, "panels": [
            {"type": "stat", "title": "nested", "targets": [{"refId": "A", "expr": "swarm_peers"}]}]}]}
    assert dashboard_queries(dashboard) == [("top", "swarm_step"), ("nested", "swarm_peers")]


def test_provisioning_points_at_prometheus_and_the_dashboards():
    sources = yaml.safe_load((MONITOR / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert (source["uid"], source["type"], source["url"]) == (DATASOURCE_UID, "prometheus", "http://prometheus:9090")
    assert source["isDefault"] is True
    boards = yaml.safe_load((MONITOR / "grafana/provisioning/dashboards/swarm.yml").read_text())
    assert [provider["options"]["path"] for provider in boards["providers"]] == [DASHBOARDS_DIR]


def test_compose_mounts_what_the_provisioning_expects():
    services = yaml.safe_load((MONITOR / "docker-compose.yml").read_text())["services"]
    mounts = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (MONITOR / source).exists(), volume
                mounts[target] = (MONITOR / source).resolve()
    assert mounts[DASHBOARDS_DIR] == DASHBOARD_PATH.parent
    assert mounts["/etc/grafana/provisioning"] == MONITOR / "grafana" / "provisioning"
    assert mounts["/etc/prometheus/prometheus.yml"] == MONITOR / "prometheus.yml"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (CI installs Debian's prometheus package)")
def test_prometheus_config_passes_promtool():
    result = subprocess.run(["promtool", "check", "config", str(MONITOR / "prometheus.yml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
