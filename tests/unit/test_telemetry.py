"""pipeline.telemetry: per-interval aggregation of a worker's answers and batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.drift import ClassHistogram, EmbeddingSummary
from pipeline.settings import Settings
from pipeline.telemetry import (
    ClassCounts,
    EmbeddingStats,
    Heartbeat,
    RequestSummary,
    Telemetry,
    decode_record,
    encode_record,
    to_drift_summary,
)


class FakeClock:
    """A hand-driven clock (wall seconds and monotonic seconds move together)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


def _telemetry(tmp_path: Path, clock: FakeClock, **kw: object) -> Telemetry:
    s = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="ut", model_dir=tmp_path,
                 worker_id="w1", pool="gpu-a", **kw)  # type: ignore[arg-type]
    return Telemetry(s, "127.0.0.1:1", clock=clock, monotonic=clock)


def _split(records: list[RequestSummary | Heartbeat]) -> tuple[
    dict[tuple[str, str, str], RequestSummary], Heartbeat
]:
    *summaries, hb = records
    assert isinstance(hb, Heartbeat)
    out = {}
    for r in summaries:
        assert isinstance(r, RequestSummary)
        out[(r.model, r.version, r.priority)] = r
    return out, hb


def test_answers_aggregate_per_model_version_priority(tmp_path: Path) -> None:
    clock = FakeClock()
    t = _telemetry(tmp_path, clock)
    t.register("digits", "1", "CPUExecutionProvider", 0.10)
    latencies = [3.0, 5.0, 7.0, 100.0]
    for ms in latencies:
        t.observe("digits", "1", "normal", ms, queue_ms=1.0, rows=2, batch_rows=8,
                  cost_usd=0.001)
    t.observe("digits", "1", "high", 2.0, batch_rows=1, cost_usd=0.5)
    t.observe_error("digits", "1", "normal", "INVALID_INPUT")
    t.observe_error("digits", "1", "normal", "INVALID_INPUT")
    t.observe_error("digits", "1", "normal", "DEADLINE_EXCEEDED")
    t.observe_error("digits", "1", "normal", "OVERLOADED")
    clock.t += 1.5
    summaries, hb = _split(t.drain())

    assert set(summaries) == {("digits", "1", "normal"), ("digits", "1", "high")}
    n = summaries[("digits", "1", "normal")]
    assert n.count == 8
    assert n.statuses == {"ok": 4, "error": 2, "expired": 1, "rejected": 1}
    assert n.errors == {"INVALID_INPUT": 2, "DEADLINE_EXCEEDED": 1, "OVERLOADED": 1}
    assert n.rows == 8
    assert n.latency_ms.count == 4
    assert n.latency_ms.sum_ms == pytest.approx(sum(latencies))
    assert (n.latency_ms.min_ms, n.latency_ms.max_ms) == (3.0, 100.0)
    assert n.queue_ms_sum == pytest.approx(4.0)
    assert n.batch_rows_sum == 32
    assert n.cost_usd == pytest.approx(0.004)
    assert (n.worker, n.pool) == ("w1", "gpu-a")
    assert n.end_ms - n.start_ms == 1500
    h = summaries[("digits", "1", "high")]
    assert (h.count, h.ok, h.cost_usd) == (1, 1, 0.5)

    assert hb.wall_s == pytest.approx(1.5)
    assert hb.hourly_usd == pytest.approx(0.10)  # no pool price set: the served version's
    assert [(v.model, v.version, v.execution_provider) for v in hb.served] == [
        ("digits", "1", "CPUExecutionProvider")
    ]


def test_drain_resets_and_heartbeats_while_idle(tmp_path: Path) -> None:
    clock = FakeClock()
    t = _telemetry(tmp_path, clock, pool_hourly_usd=2.5)
    t.register("digits", "1", "CPUExecutionProvider", 0.10)
    t.observe("digits", "1", "normal", 4.0)
    t.observe_compute("digits", "1", 1, 0.25)
    clock.t += 1.0
    first, hb1 = _split(t.drain())
    assert first[("digits", "1", "normal")].count == 1
    assert hb1.busy_s == pytest.approx(0.25)
    assert hb1.served[0].batches == 1

    clock.t += 2.0
    second, hb2 = _split(t.drain())
    assert second == {}  # nothing answered: only the heartbeat
    assert hb2.busy_s == 0.0 and hb2.wall_s == pytest.approx(2.0)
    assert hb2.hourly_usd == 2.5
    assert hb2.served[0].batches == 0 and hb2.served[0].outputs is None
    assert hb2.start_ms == hb1.end_ms  # intervals tile time without gaps


def test_compute_and_class_histogram_per_version(tmp_path: Path) -> None:
    clock = FakeClock()
    t = _telemetry(tmp_path, clock)
    t.register("digits", "1", "CPUExecutionProvider", 0.10)
    probs = np.full((4, 10), 0.1, dtype=np.float32)
    t.observe_compute("digits", "1", 4, 0.010,
                      {"label": np.array([3, 3, 7, 0]), "probabilities": probs})
    t.observe_compute("digits", "1", 2, 0.005,
                      {"label": np.array([3, 9]), "probabilities": probs[:2]})
    _, hb = _split(t.drain())
    v = hb.served[0]
    assert (v.batches, v.rows) == (2, 6)
    assert v.compute_s == pytest.approx(0.015)
    assert isinstance(v.outputs, ClassCounts)
    # Ten bins (the probabilities' width) even though classes 1, 2, 4.. were never seen.
    assert v.outputs.counts == [1, 0, 0, 3, 0, 0, 0, 1, 0, 1]
    drift = to_drift_summary(v.outputs)
    assert drift == ClassHistogram.from_labels([3, 3, 7, 0, 3, 9], 10)


def test_embedding_stats_match_the_drift_summary(tmp_path: Path) -> None:
    clock = FakeClock()
    t = _telemetry(tmp_path, clock)
    t.register("minilm", "1", "CPUExecutionProvider", 0.10)
    rng = np.random.default_rng(7)
    a = rng.normal(size=(5, 8)).astype(np.float32)
    b = rng.normal(size=(3, 8)).astype(np.float32) * 2
    t.observe_compute("minilm", "1", 5, 0.02, {"embedding": a})
    t.observe_compute("minilm", "1", 3, 0.02, {"embedding": b})
    _, hb = _split(t.drain())
    stats = hb.served[0].outputs
    assert isinstance(stats, EmbeddingStats)
    got = to_drift_summary(stats)
    want = EmbeddingSummary.from_rows(np.concatenate([a, b]))
    assert isinstance(got, EmbeddingSummary)
    assert got.count == 8
    assert got.mean_norm == pytest.approx(want.mean_norm)
    assert got.norm_std == pytest.approx(want.norm_std)
    np.testing.assert_allclose(got.unit_sum, want.unit_sum, rtol=1e-6)


def test_busy_seconds_sum_over_versions(tmp_path: Path) -> None:
    clock = FakeClock()
    t = _telemetry(tmp_path, clock)
    t.register("digits", "1", "CPUExecutionProvider", 0.10)
    t.register("minilm", "2", "CUDAExecutionProvider", 0.90)
    t.observe_compute("digits", "1", 8, 0.1)
    t.observe_compute("minilm", "2", 8, 0.3)
    clock.t += 1.0
    _, hb = _split(t.drain())
    assert hb.busy_s == pytest.approx(0.4)
    assert hb.hourly_usd == pytest.approx(0.90)  # the dearest served version
    assert {v.model: v.compute_s for v in hb.served} == pytest.approx(
        {"digits": 0.1, "minilm": 0.3}
    )


def test_unparseable_requests_count_under_unknown(tmp_path: Path) -> None:
    t = _telemetry(tmp_path, FakeClock())
    t.observe_error("", None, "normal", "INVALID_REQUEST")
    summaries, _ = _split(t.drain())
    assert summaries[("unknown", "", "normal")].errors == {"INVALID_REQUEST": 1}


def test_records_round_trip_through_json(tmp_path: Path) -> None:
    clock = FakeClock()
    t = _telemetry(tmp_path, clock)
    t.register("digits", "1", "CPUExecutionProvider", 0.10)
    for ms in (1.0, 2.0, 40.0):
        t.observe("digits", "1", "batch", ms)
    t.observe_compute("digits", "1", 3, 0.01, {"label": np.array([1, 1, 2])})
    clock.t += 1.0
    records = t.drain()
    for rec in records:
        assert decode_record(encode_record(rec)) == rec


def test_disabled_telemetry_never_connects(tmp_path: Path) -> None:
    import asyncio

    t = _telemetry(tmp_path, FakeClock(), telemetry_interval_ms=0)
    assert not t.enabled

    async def cycle() -> None:
        await t.start()  # the bootstrap address is unreachable: connecting would fail
        await t.stop()

    asyncio.run(cycle())
    t.observe("digits", "1", "normal", 1.0)  # still cheap and harmless
