"""Metrics: the pool label bound at construction, cached children, the declared series."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics import Metrics


def _samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(m.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_sample_carries_the_pool_bound_at_construction() -> None:
    m = Metrics(pool="gpu-a")
    m.request_child("digits", "1", "high", "ok").inc(3)
    m.latency_child("digits", "1", "high").observe(0.02)
    m.queue_child("digits", "1", "high").observe(0.004)
    m.cost_child("digits", "1").inc(0.5)
    m.routed_child("digits", "batch").inc()
    m.worker_ready.set(1)
    samples = _samples(m)
    assert samples
    for name, labels in samples:
        assert ("pool", "gpu-a") in labels, (name, labels)
    key = frozenset(
        {"model": "digits", "version": "1", "priority": "high", "status": "ok",
         "pool": "gpu-a"}.items()
    )
    assert samples[("inferline_requests_total", key)] == 3
    assert m.registry.get_sample_value(
        "inferline_cost_usd_total", {"model": "digits", "version": "1", "pool": "gpu-a"}
    ) == 0.5
    assert m.registry.get_sample_value(
        "inferline_queue_duration_seconds_bucket",
        {"model": "digits", "version": "1", "priority": "high", "pool": "gpu-a", "le": "0.005"},
    ) == 1
    assert m.registry.get_sample_value(
        "inferline_queue_duration_seconds_bucket",
        {"model": "digits", "version": "1", "priority": "high", "pool": "gpu-a", "le": "0.0025"},
    ) == 0
    assert m.registry.get_sample_value("inferline_worker_ready", {"pool": "gpu-a"}) == 1
    assert m.registry.get_sample_value(
        "inferline_routed_total", {"model": "digits", "priority": "batch", "pool": "gpu-a"}
    ) == 1


def test_default_pool_and_a_given_registry() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    assert m.registry is registry
    m.batch_size.labels("digits", "1").observe(64)
    assert registry.get_sample_value(
        "inferline_batch_size_count", {"model": "digits", "version": "1", "pool": "default"}
    ) == 1


def test_two_instances_keep_their_series_apart() -> None:
    a, b = Metrics(pool="a"), Metrics(pool="b")
    a.request_child("digits", "1", "normal", "ok").inc()
    labels = {"model": "digits", "version": "1", "priority": "normal", "status": "ok"}
    assert a.registry.get_sample_value("inferline_requests_total", {**labels, "pool": "a"}) == 1
    assert b.registry.get_sample_value("inferline_requests_total", {**labels, "pool": "b"}) is None


def test_children_are_cached_per_label_set() -> None:
    m = Metrics()
    assert m.request_child("digits", "1", "high", "ok") is m.request_child(
        "digits", "1", "high", "ok"
    )
    assert m.request_child("digits", "1", "high", "ok") is not m.request_child(
        "digits", "1", "high", "error"
    )
    assert m.latency_child("d", "1", "high") is m.latency_child("d", "1", "high")
    assert m.queue_child("d", "1", "high") is m.queue_child("d", "1", "high")
    assert m.cost_child("d", "1") is m.cost_child("d", "1")
    assert m.routed_child("d", "high") is m.routed_child("d", "high")


def test_series_names_cover_unused_label_sets_with_their_suffixes() -> None:
    names = Metrics().series_names()
    for expected in (
        "inferline_requests_total",
        "inferline_request_duration_seconds_bucket",
        "inferline_request_duration_seconds_count",
        "inferline_request_duration_seconds_sum",
        "inferline_queue_duration_seconds_bucket",
        "inferline_compute_duration_seconds_bucket",
        "inferline_batch_size_bucket",
        "inferline_cost_usd_total",
        "inferline_routed_total",
        "inferline_dlq_records_total",
        "inferline_model_ready",
        "inferline_worker_ready",
        "inferline_lane_backlog_messages",
        "inferline_lane_lag_seconds",
        "inferline_lane_paused",
        "inferline_inflight_requests",
    ):
        assert expected in names, expected
    # A counter exposes no bare family name, a gauge no _total.
    assert "inferline_requests" not in names
    assert "inferline_model_ready_total" not in names


def test_readme_metrics_table_names_declared_series() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    listed = {
        name for row in rows for name in re.findall(r"`(inferline_\w+)`", row.split("|")[1])
    }
    assert len(listed) >= 15
    declared = Metrics().series_names()
    # Histograms are listed by family name; their series carry _bucket, _count, _sum.
    assert {n for n in listed if n not in declared and f"{n}_count" not in declared} == set()
