"""deploy/grafana: the dashboard is valid JSON whose queries parse (promtool) and read only
series that pipeline/metrics.py declares, on the provisioned datasource."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, load_yaml, promql_metric_names, run_promtool

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "inferline.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row keeps its panels inside
    return out


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every target, and the template variables' queries."""
    found = [
        (p["title"], t["expr"])
        for p in _panels(dashboard) if p["type"] != "row" for t in p["targets"]
    ]
    for var in dashboard["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
        assert m, var
        found.append((f"${var['name']}", m.group(1)))
    return found


def _as_promql(expr: str) -> str:
    """Grafana's variables replaced by what they stand for, so that promtool can parse it."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    return re.sub(r"\$\w+", ".*", expr)


def test_dashboard_is_provisioned_on_the_prometheus_datasource(dashboard: dict[str, Any]) -> None:
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    uid = datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["type"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]


def test_queries_read_declared_series(
    dashboard: dict[str, Any], declared_series: frozenset[str]
) -> None:
    used: set[str] = set()
    for title, expr in _queries(dashboard):
        names = promql_metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - declared_series
        assert not unknown, f"{title}: {sorted(unknown)} not declared in pipeline/metrics.py"
        used |= names
    # The dashboard shows the families the pipeline exposes (a new one wants a panel).
    families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in used}
    for wanted in ("inferline_requests_total", "inferline_request_duration_seconds",
                   "inferline_queue_duration_seconds", "inferline_compute_duration_seconds",
                   "inferline_batch_size", "inferline_inflight_requests",
                   "inferline_lane_lag_seconds", "inferline_lane_backlog_messages",
                   "inferline_cost_usd_total", "inferline_worker_ready",
                   "inferline_model_ready"):
        assert wanted in families, wanted


def test_queries_parse(dashboard: dict[str, Any], promtool: str, tmp_path: Path) -> None:
    # promtool parses PromQL when it checks rules: one recording rule per query.
    rules = [
        {"record": f"dashboard:query:{i}", "expr": _as_promql(expr)}
        for i, (_title, expr) in enumerate(_queries(dashboard))
        if not expr.isidentifier()  # a template variable's metric alone is trivially fine
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run_promtool(promtool, "check", "rules", path)
    assert f"SUCCESS: {len(rules)} rules found" in out
