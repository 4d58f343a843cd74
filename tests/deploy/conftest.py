"""Shared helpers of the deploy/ checks: the repository's files, PromQL names, promtool."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# Words of PromQL that look like metric names but are not.
_PROMQL_WORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan", "start", "end",
})
# Series every Prometheus has of its own.
PROMETHEUS_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds",
                               "scrape_samples_scraped", "scrape_series_added"})


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not its functions, labels or keywords)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", s):
        if m.group(1).lower() not in _PROMQL_WORDS:
            names.add(m.group(1))
    return names


@pytest.fixture(scope="session")
def declared_series() -> frozenset[str]:
    """Every series name pipeline/metrics.py declares, from a live Metrics instance."""
    return Metrics().series_names()


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool (Debian package ``prometheus``); the checks fail without it."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is required (apt-get install -y prometheus)", pytrace=False)
    return found


def run_promtool(promtool: str, *args: str | Path) -> str:
    """Run promtool; fails the test with its output unless it exits 0."""
    proc = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {shlex.join(map(str, args))}:\n{out}"
    return out


def load_yaml(path: Path) -> Any:
    """One YAML document."""
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_docs(path: Path) -> Iterator[Any]:
    """Every document of a YAML file."""
    with path.open(encoding="utf-8") as f:
        yield from (d for d in yaml.safe_load_all(f) if d is not None)


def dockerfile_pools() -> dict[str, str]:
    """Model -> pool as deploy/Dockerfile assigns them (``inferline pools set ...``)."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    m = re.search(r"inferline pools set ((?:[\w.-]+=[\w.-]+ ?)+)", text)
    assert m, "deploy/Dockerfile assigns no pools"
    return dict(item.split("=", 1) for item in m.group(1).split())
