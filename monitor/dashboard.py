"""The Grafana dashboard shipped for the monitor, read as data so tests can hold it to ``monitor.metrics``.

The dashboard itself is ``monitor/grafana/dashboards/swarm.json``; ``monitor/docker-compose.yml`` runs it with
Prometheus and Grafana (provisioning under ``monitor/grafana/provisioning``). This module owns reading that
file: every PromQL query in it (``dashboard_queries``) and the metric names a query uses
(``metric_names_in``), so that a dashboard naming a metric the monitor does not export fails a test instead of
showing an empty panel. Standard library only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

DASHBOARD_PATH = Path(__file__).resolve().parent / "grafana" / "dashboards" / "swarm.json"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')  # PromQL string literals
# A swarm_* identifier taken whole (so a typo like swarm_loss2 is reported as itself), not part of a longer
# name or a Grafana variable; a name followed by "(" is a function call, not a metric.
_METRIC = re.compile(r"(?<![\w:$])swarm_[a-z_][\w:]*(?![\w:]*\s*\()")


def load_dashboard() -> dict[str, Any]:
    with open(DASHBOARD_PATH, encoding="utf-8") as file:
        return json.load(file)


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) row panels, rows themselves included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from iter_panels(panel)


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every target of every panel, in dashboard order."""
    dashboard = load_dashboard() if dashboard is None else dashboard
    return [(panel.get("title", ""), target["expr"])
            for panel in iter_panels(dashboard) for target in panel.get("targets", []) if "expr" in target]


def metric_names_in(expr: str) -> set[str]:
    """The ``swarm_*`` metric names a PromQL expression reads (string literals and function names ignored)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))
