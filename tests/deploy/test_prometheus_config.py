"""deploy/prometheus: promtool accepts the config and every rule file; the rules' unit tests
pass; and the rules only read series that pipeline/metrics.py declares."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from tests.deploy.conftest import (
    DEPLOY,
    PROMETHEUS_SERIES,
    load_yaml,
    promql_metric_names,
    run_promtool,
)

PROM = DEPLOY / "prometheus"
CONFIG = PROM / "prometheus.yml"


def _rule_files() -> list[Path]:
    """Every rule file of deploy/prometheus: each *.yml of the folder but the config."""
    return sorted(p for p in PROM.glob("*.yml") if p != CONFIG)


def _rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_config(promtool: str) -> None:
    out = run_promtool(promtool, "check", "config", CONFIG)
    assert "SUCCESS" in out


def test_every_rule_file_is_loaded_and_valid(promtool: str) -> None:
    files = _rule_files()
    assert PROM / "recording.yml" in files
    patterns = load_yaml(CONFIG)["rule_files"]
    for path in files:
        assert any(fnmatch.fnmatch(path.name, p) for p in patterns), (
            f"{path.name} is not in rule_files of {CONFIG.name}: {patterns}"
        )
        out = run_promtool(promtool, "check", "rules", path)
        assert f"SUCCESS: {len(_rules(path))} rules found" in out, out


def test_rule_unit_tests_pass(promtool: str) -> None:
    tests = sorted((PROM / "tests").glob("*.yml"))
    assert tests
    tested = set()
    for path in tests:
        run_promtool(promtool, "test", "rules", path)
        tested |= {(path.parent / f).resolve() for f in load_yaml(path)["rule_files"]}
    # Every recording rule file has its unit tests.
    assert (PROM / "recording.yml").resolve() in tested
    recorded = {r["record"] for r in _rules(PROM / "recording.yml")}
    exercised = {
        t["expr"] for path in tests for case in load_yaml(path)["tests"]
        for t in case.get("promql_expr_test", ())
    }
    assert recorded <= exercised, recorded - exercised


def test_rules_read_declared_series_only(declared_series: frozenset[str]) -> None:
    recorded = {r["record"] for path in _rule_files() for r in _rules(path) if "record" in r}
    for path in _rule_files():
        for rule in _rules(path):
            names = promql_metric_names(rule["expr"])
            assert names, rule
            unknown = names - declared_series - recorded - PROMETHEUS_SERIES
            assert not unknown, f"{path.name}: {rule.get('record') or rule.get('alert')}: {unknown}"


def test_promql_metric_names_extracts_selectors_only() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (model, le) (rate("
        'inferline_request_duration_seconds_bucket{model=~"$model",status!="ok"}'
        "[$__rate_interval]))) / on (model) group_left "
        "sum without (pool) (inferline_routed_total offset 5m) > bool 1e3 "
        "or vector(0) unless absent(up) and model:x:rate1m"
    )
    assert promql_metric_names(expr) == {
        "inferline_request_duration_seconds_bucket", "inferline_routed_total", "up",
        "model:x:rate1m",
    }
