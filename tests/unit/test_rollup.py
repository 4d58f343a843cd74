"""pipeline.rollup: telemetry of many workers and intervals rolled up into window stats."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from pipeline.rollup import (
    ALL_PRIORITIES,
    WindowStats,
    add_record,
    close_window,
    decode_stats,
    encode_stats,
    new_state,
)
from pipeline.stats import LatencySketch
from pipeline.telemetry import ClassCounts, Heartbeat, RequestSummary, ServedVersion


def _summary(model: str, priority: str, latencies: list[float], *, errors: dict[str, int]
             | None = None, cost: float = 0.0, batch_rows: int = 0, worker: str = "w1",
             version: str = "1") -> RequestSummary:
    sk = LatencySketch()
    for v in latencies:
        sk.add(v)
    errors = errors or {}
    statuses = {"ok": len(latencies)} if latencies else {}
    if errors:
        statuses["error"] = sum(errors.values())
    return RequestSummary(
        worker=worker, pool="p", model=model, version=version, priority=priority,
        start_ms=0, end_ms=1000, count=len(latencies) + sum(errors.values()),
        statuses=statuses, errors=errors, rows=len(latencies), latency_ms=sk.to_data(),
        queue_ms_sum=2.0 * len(latencies), batch_rows_sum=batch_rows, cost_usd=cost,
    )


def _heartbeat(worker: str, hourly: float, wall: float, compute: dict[tuple[str, str], float],
               outputs: dict[tuple[str, str], ClassCounts] | None = None) -> Heartbeat:
    served = [
        ServedVersion(model=m, version=v, execution_provider="CPUExecutionProvider",
                      hourly_usd=hourly, compute_s=c, outputs=(outputs or {}).get((m, v)))
        for (m, v), c in compute.items()
    ]
    return Heartbeat(worker=worker, pool="p", started_ms=0, start_ms=0, end_ms=1000,
                     wall_s=wall, busy_s=sum(compute.values()), hourly_usd=hourly,
                     served=served)


def _by(records: list[WindowStats]) -> dict[tuple[str, str, str], WindowStats]:
    return {(r.model, r.version, r.priority): r for r in records}


def _rolled(records: list[RequestSummary | Heartbeat]) -> dict[tuple[str, str, str], WindowStats]:
    state = new_state()
    for r in records:
        add_record(state, r)
        # The state lives in a JSON changelog: it must survive a round trip at any point.
        state = orjson.loads(orjson.dumps(state))
    return _by(close_window(state, 10_000, 20_000))


def test_counts_latency_and_batches_add_across_workers_and_intervals() -> None:
    rng = np.random.default_rng(3)
    parts = [list(rng.exponential(20.0, size=n)) for n in (100, 250, 50)]
    out = _rolled([
        _summary("digits", "normal", parts[0], batch_rows=800, worker="w1"),
        _summary("digits", "normal", parts[1], errors={"INVALID_INPUT": 5}, batch_rows=2000,
                 worker="w2"),
        _summary("digits", "high", parts[2], errors={"DEADLINE_EXCEEDED": 1}, batch_rows=50),
    ])
    normal = out[("digits", "1", "normal")]
    assert normal.count == 355 and normal.ok == 350
    assert normal.errors == {"INVALID_INPUT": 5}
    assert normal.error_rate == pytest.approx(5 / 355)
    assert normal.throughput_rps == pytest.approx(35.5)  # a 10 s window
    assert normal.mean_batch_size == pytest.approx(2800 / 350)
    assert normal.mean_queue_ms == pytest.approx(2.0)
    union = np.concatenate([parts[0], parts[1]])
    for q, got in ((0.5, normal.p50_ms), (0.95, normal.p95_ms), (0.99, normal.p99_ms)):
        exact = float(np.sort(union)[int(np.ceil(q * len(union))) - 1])
        assert got == pytest.approx(exact, rel=0.021)
    everything = out[("digits", "1", ALL_PRIORITIES)]
    assert everything.count == 406 and everything.ok == 400
    assert everything.errors == {"INVALID_INPUT": 5, "DEADLINE_EXCEEDED": 1}
    assert everything.mean_batch_size == pytest.approx(2850 / 400)


def test_idle_capacity_is_charged_by_compute_share() -> None:
    # w1: $3.60/h for 10 s = $0.01, all for digits, which computed 2 s of it.
    # w2: $7.20/h for 10 s = $0.02, digits 1 s and minilm 3 s: shares 1/4 and 3/4.
    out = _rolled([
        _heartbeat("w1", 3.6, 10.0, {("digits", "1"): 2.0}),
        _heartbeat("w2", 7.2, 10.0, {("digits", "1"): 1.0, ("minilm", "1"): 3.0}),
        _summary("digits", "normal", [5.0] * 300, cost=0.003),
        _summary("digits", "high", [5.0] * 100, cost=0.001),
        _summary("minilm", "normal", [50.0] * 200, cost=0.006),
    ])
    d = out[("digits", "1", ALL_PRIORITIES)]
    assert d.total_cost_usd == pytest.approx(0.01 + 0.005)
    assert d.compute_cost_usd == pytest.approx(3.6 * 2 / 3600 + 7.2 * 1 / 3600)
    assert d.idle_cost_usd == pytest.approx(d.total_cost_usd - d.compute_cost_usd)
    assert d.utilization == pytest.approx(3.0 / 12.5)
    assert d.cost_per_1000_usd == pytest.approx(1000 * 0.015 / 400)
    assert d.compute_cost_per_1000_usd == pytest.approx(1000 * d.compute_cost_usd / 400)
    assert d.charged_usd == pytest.approx(0.004)
    assert d.workers == ["w1", "w2"]
    # Priorities split the version's cost by what their answers were charged: 3:1.
    assert out[("digits", "1", "normal")].total_cost_usd == pytest.approx(0.015 * 0.75)
    assert out[("digits", "1", "high")].total_cost_usd == pytest.approx(0.015 * 0.25)
    m = out[("minilm", "1", ALL_PRIORITIES)]
    assert m.total_cost_usd == pytest.approx(0.015)
    assert m.compute_cost_usd == pytest.approx(7.2 * 3 / 3600)
    assert m.utilization == pytest.approx(3.0 / 7.5)
    # Every dollar of worker time lands on some model.
    assert d.total_cost_usd + m.total_cost_usd == pytest.approx(0.03)


def test_a_version_that_answered_nothing_still_pays_for_its_capacity() -> None:
    out = _rolled([_heartbeat("w1", 3.6, 10.0, {("digits", "1"): 0.0, ("minilm", "1"): 0.0})])
    assert set(out) == {("digits", "1", ALL_PRIORITIES), ("minilm", "1", ALL_PRIORITIES)}
    for rec in out.values():
        assert rec.count == 0 and rec.p99_ms is None
        assert rec.total_cost_usd == pytest.approx(0.005)  # split evenly while idle
        assert rec.idle_cost_usd == pytest.approx(0.005) and rec.compute_cost_usd == 0.0
        assert rec.utilization == 0.0 and rec.cost_per_1000_usd == 0.0


def test_busier_than_wall_clock_is_fully_utilised() -> None:
    # Two sessions ran side by side: 6 s of compute in 4 s of wall time.
    out = _rolled([_heartbeat("w1", 3.6, 4.0, {("a", "1"): 3.0, ("b", "1"): 3.0})])
    a = out[("a", "1", ALL_PRIORITIES)]
    assert a.total_cost_usd == pytest.approx(0.002)
    assert a.idle_cost_usd == pytest.approx(0.0)
    assert a.utilization == pytest.approx(1.0)


def test_output_summaries_merge_across_workers() -> None:
    out = _rolled([
        _heartbeat("w1", 0.1, 1.0, {("digits", "1"): 0.1},
                   {("digits", "1"): ClassCounts(counts=[1, 2, 0])}),
        _heartbeat("w2", 0.1, 1.0, {("digits", "1"): 0.1},
                   {("digits", "1"): ClassCounts(counts=[0, 1, 4, 1])}),
    ])
    outputs = out[("digits", "1", ALL_PRIORITIES)].outputs
    assert isinstance(outputs, ClassCounts)
    assert outputs.counts == [1, 3, 4, 1]


def test_metrics_records_round_trip() -> None:
    out = _rolled([_summary("digits", "batch", [1.0, 2.0, 3.0])])
    for rec in out.values():
        assert decode_stats(encode_stats(rec)) == rec
