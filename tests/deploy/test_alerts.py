"""deploy/prometheus/alerts.yml: valid, on declared series, and each class fires alone.

promtool (Debian package ``prometheus``) checks the rules and runs their unit tests
(deploy/prometheus/tests/alerts_test.yml); without it these tests fail, not skip.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

from tests.deploy.conftest import (
    DEPLOY,
    PROMETHEUS_SERIES,
    load_yaml,
    promql_metric_names,
    run_promtool,
)

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "tests" / "alerts_test.yml"
CLASSES = {"inferline.infrastructure": "infrastructure", "inferline.model": "model"}


def _rules() -> list[tuple[str, dict[str, Any]]]:
    return [(g["name"], r) for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]


def _alert_class() -> dict[str, str]:
    return {r["alert"]: r["labels"]["class"] for _, r in _rules()}


def test_promtool_accepts_the_rules(promtool: str) -> None:
    out = run_promtool(promtool, "check", "rules", ALERTS)
    assert f"SUCCESS: {len(_rules())} rules found" in out, out


def test_promtool_unit_tests_pass(promtool: str) -> None:
    out = run_promtool(promtool, "test", "rules", ALERT_TESTS)
    assert "SUCCESS" in out, out


def test_two_groups_one_per_class() -> None:
    groups = [g["name"] for g in load_yaml(ALERTS)["groups"]]
    assert groups == list(CLASSES)
    for group, rule in _rules():
        assert "alert" in rule, f"{group} holds a non-alert rule {rule}"
        assert rule["labels"]["class"] == CLASSES[group], rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alerts_read_only_series_the_code_declares(declared_series: frozenset[str]) -> None:
    for _, rule in _rules():
        names = promql_metric_names(rule["expr"])
        assert names, rule["alert"]
        unknown = names - declared_series - PROMETHEUS_SERIES
        assert not unknown, f"{rule['alert']} reads {sorted(unknown)}, not in pipeline/metrics.py"


@pytest.fixture(scope="module")
def scenarios() -> list[dict[tuple[str, str], bool]]:
    """Per unit-test scenario: (eval time, alert) -> whether it is expected to fire."""
    out = []
    for case in load_yaml(ALERT_TESTS)["tests"]:
        seen: dict[tuple[str, str], bool] = {}
        for t in case.get("alert_rule_test", []):
            seen[(t["eval_time"], t["alertname"])] = bool(t.get("exp_alerts"))
        out.append(seen)
    return out


def test_every_alert_fires_in_some_scenario(scenarios: list[dict[tuple[str, str], bool]]) -> None:
    fired = {alert for s in scenarios for (_, alert), fires in s.items() if fires}
    assert fired == set(_alert_class())


def test_when_one_class_fires_the_other_is_shown_silent(
    scenarios: list[dict[tuple[str, str], bool]],
) -> None:
    classes = _alert_class()
    by_class: dict[str, set[str]] = defaultdict(set)
    for alert, cls in classes.items():
        by_class[cls].add(alert)
    checked = 0
    for s in scenarios:
        for (at, alert), fires in s.items():
            if not fires:
                continue
            other = by_class["model" if classes[alert] == "infrastructure" else "infrastructure"]
            silent = {a for (t, a), f in s.items() if t == at and not f}
            assert other <= silent, (
                f"{alert} fires at {at}, but the scenario does not show "
                f"{sorted(other - silent)} silent then"
            )
            checked += 1
    assert checked >= len(classes)
