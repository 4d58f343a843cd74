"""pipeline.health: each cause is told apart, with time and telemetry under the test's control."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from pipeline.drift import ClassHistogram, EmbeddingSummary, Reference
from pipeline.health import HealthMonitor, HealthThresholds, export_gauges
from pipeline.metrics import Metrics
from pipeline.settings import Settings
from pipeline.telemetry import (
    ClassCounts,
    EmbeddingStats,
    Heartbeat,
    RequestSummary,
    ServedVersion,
)

T0 = 1_700_000_000_000  # epoch ms
SEC = 1000
UNIFORM = [10.0] * 10  # 100 rows per interval, every digit alike
SKEWED = [100.0] + [0.0] * 9  # every row is a 0
THRESHOLDS = HealthThresholds(heartbeat_timeout_ms=3 * SEC, window_ms=10 * SEC,
                              reference_rows=300)


def beat(
    worker: str, at_ms: int, *, model: str = "digits", version: str = "1",
    counts: Sequence[float] | None = UNIFORM, provider: str = "CPUExecutionProvider",
    outputs: ClassCounts | EmbeddingStats | None = None,
) -> Heartbeat:
    if outputs is None and counts is not None:
        outputs = ClassCounts(counts=list(counts))
    return Heartbeat(
        worker=worker, pool="default", started_ms=T0, start_ms=at_ms - SEC, end_ms=at_ms,
        wall_s=1.0, busy_s=0.01, hourly_usd=0.1,
        served=[ServedVersion(model=model, version=version, execution_provider=provider,
                              hourly_usd=0.1, outputs=outputs)],
    )


def answers(
    at_ms: int, *, ok: int = 100, expired: int = 0, errors: dict[str, int] | None = None,
    model: str = "digits",
) -> RequestSummary:
    errs = errors or {}
    statuses = {"ok": ok, "expired": expired, "error": sum(errs.values())}
    codes = {**errs, **({"DEADLINE_EXCEEDED": expired} if expired else {})}
    return RequestSummary(
        worker="w1", pool="default", model=model, version="1", priority="normal",
        start_ms=at_ms - SEC, end_ms=at_ms, count=ok + expired + sum(errs.values()),
        statuses=statuses, errors=codes, rows=ok,
    )


def run(mon: HealthMonitor, workers: Sequence[str], seconds: range, **kw: object) -> None:
    """One heartbeat per worker and second (outputs split between them)."""
    for s in seconds:
        for w in workers:
            mon.observe(beat(w, T0 + s * SEC, **kw))  # type: ignore[arg-type]


def test_steady_traffic_is_healthy() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1", "w2"], range(1, 21))
    for s in range(1, 21):
        mon.observe(answers(T0 + s * SEC))
    h = mon.assess(T0 + 20 * SEC + 200)[("digits", "1")]
    assert h.state == "healthy", h.reasons
    assert h.reasons == [] and not h.infra and not h.model
    assert h.reason == "ok"
    assert h.live_workers == ("w1", "w2")
    assert h.drift is not None and h.drift.psi == pytest.approx(0.0)
    assert h.reference == "first 300 rows"


def test_silent_worker_is_missing_infrastructure() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1", "w2"], range(1, 11))
    run(mon, ["w1"], range(11, 21))  # w2 stops beating at 10 s
    h = mon.assess(T0 + 20 * SEC)[("digits", "1")]
    assert h.state == "degraded-infra"
    assert h.infra and not h.model
    assert h.reasons == [
        "infrastructure: worker w2 (pool default) missing (no heartbeat for 10 s)"
    ]
    assert h.live_workers == ("w1",)
    # Within the timeout it is not missing yet.
    mon2 = HealthMonitor(THRESHOLDS)
    run(mon2, ["w1", "w2"], range(1, 11))
    assert mon2.assess(T0 + 12 * SEC)[("digits", "1")].state == "healthy"


def test_last_worker_gone_is_down() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1"], range(1, 11))
    h = mon.assess(T0 + 14_500)[("digits", "1")]
    assert h.state == "down" and h.infra
    assert "infrastructure: worker w1 (pool default) missing (no heartbeat for 4.5 s)" in h.reasons
    assert "infrastructure: no live worker serves digits:1" in h.reasons


def test_worker_that_announced_its_stop_is_not_missing() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1", "w2"], range(1, 11))
    mon.observe_readiness("w2", "stopping", T0 + 10 * SEC + 50)
    run(mon, ["w1"], range(11, 21))
    assert mon.assess(T0 + 20 * SEC)[("digits", "1")].state == "healthy"
    # The last one stopping leaves the model down, and says why.
    mon.observe_readiness("w1", "stopping", T0 + 20 * SEC + 50)
    h = mon.assess(T0 + 21 * SEC)[("digits", "1")]
    assert h.state == "down"
    assert h.reasons == ["infrastructure: no live worker serves digits:1 (w1, w2 stopped)"]
    # A worker that comes back under the same id is live again.
    mon.observe(beat("w2", T0 + 22 * SEC))
    assert mon.assess(T0 + 22 * SEC)[("digits", "1")].live_workers == ("w2",)


def test_expected_version_without_any_worker_is_down() -> None:
    mon = HealthMonitor(THRESHOLDS)
    mon.expect("digits", "1")
    h = mon.assess(T0)[("digits", "1")]
    assert h.state == "down"
    assert h.reasons == ["infrastructure: no worker has announced digits:1 (no heartbeat seen)"]


def test_shifted_class_histogram_is_model_drift() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1"], range(1, 11))  # reference: first 300 rows, uniform
    run(mon, ["w1"], range(11, 21), counts=SKEWED)
    h = mon.assess(T0 + 20 * SEC)[("digits", "1")]
    assert h.state == "degraded-model"
    assert h.model and not h.infra
    assert len(h.reasons) == 1
    assert h.reasons[0].startswith("model degradation: class histogram PSI=")
    assert "100% of rows are class 0" in h.reasons[0]
    assert h.drift is not None and h.drift.psi is not None and h.drift.psi > 0.2


def test_drift_window_leaves_out_the_reference_rows() -> None:
    # Skewed traffic right after the reference: the window holds only the skewed rows,
    # even though it reaches back over the reference's time.
    mon = HealthMonitor(HealthThresholds(window_ms=60 * SEC, reference_rows=300))
    run(mon, ["w1"], range(1, 4))
    run(mon, ["w1"], range(4, 6), counts=SKEWED)
    h = mon.assess(T0 + 6 * SEC)[("digits", "1")]
    assert h.drift is not None and h.drift.rows == 200
    assert h.state == "degraded-model"


def test_reference_from_a_file_wins_over_first_rows() -> None:
    ref = Reference("digits", "1", ClassHistogram(tuple(SKEWED)), "refs.json")
    mon = HealthMonitor(THRESHOLDS, references={("digits", "1"): ref})
    run(mon, ["w1"], range(1, 11))  # uniform: drifted from the skewed reference
    h = mon.assess(T0 + 10 * SEC)[("digits", "1")]
    assert h.state == "degraded-model" and h.reference == "refs.json"
    assert mon.references() == [ref]


def test_no_verdict_on_drift_while_the_reference_is_collected() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1"], range(1, 3), counts=SKEWED)  # 200 of 300 rows
    h = mon.assess(T0 + 2 * SEC)[("digits", "1")]
    assert h.state == "healthy" and h.drift is None
    assert h.reference == "collecting reference: 200 of 300 rows"
    run(mon, ["w1"], range(3, 5), counts=SKEWED)
    h = mon.assess(T0 + 4 * SEC)[("digits", "1")]
    assert h.reference == "first 300 rows"


def _emb(rng: np.random.Generator, center: np.ndarray, n: int) -> EmbeddingStats:
    rows = center + rng.normal(scale=0.2, size=(n, center.size))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    s = EmbeddingSummary.from_rows(rows)
    return EmbeddingStats(count=s.count, norm_sum=s.norm_sum, norm_sq_sum=s.norm_sq_sum,
                          unit_sum=list(s.unit_sum))


def test_embedder_moving_away_from_its_centroid_is_model_drift() -> None:
    rng = np.random.default_rng(7)
    home, away = rng.normal(size=32), rng.normal(size=32)
    mon = HealthMonitor(THRESHOLDS)
    for s in range(1, 11):
        mon.observe(beat("w1", T0 + s * SEC, model="minilm", outputs=_emb(rng, home, 100)))
    assert mon.assess(T0 + 10 * SEC)[("minilm", "1")].state == "healthy"
    for s in range(11, 21):
        mon.observe(beat("w1", T0 + s * SEC, model="minilm", outputs=_emb(rng, away, 100)))
    h = mon.assess(T0 + 20 * SEC)[("minilm", "1")]
    assert h.state == "degraded-model"
    assert "cosine to the reference centroid" in h.reason


def test_rising_invalid_input_is_model_degradation() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1"], range(1, 31))
    for s in range(1, 21):
        mon.observe(answers(T0 + s * SEC))
    for s in range(21, 31):
        mon.observe(answers(T0 + s * SEC, ok=60))
        for _ in range(40):  # the router refused these, per the DLQ
            mon.observe_rejection("digits", "INVALID_INPUT", T0 + s * SEC)
    h = mon.assess(T0 + 30 * SEC)[("digits", "1")]
    assert h.state == "degraded-model" and h.model and not h.infra
    assert h.reasons == [
        "model degradation: INVALID_INPUT rate 40% of 1000 answers over the last 10 s "
        "(before: 0%, threshold 5%)"
    ]


def test_invalid_input_that_was_always_there_is_not_rising() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1"], range(1, 31))
    for s in range(1, 31):
        mon.observe(answers(T0 + s * SEC, ok=80, errors={"INVALID_INPUT": 20}))
    assert mon.assess(T0 + 30 * SEC)[("digits", "1")].state == "healthy"


def test_growing_lane_lag_is_infrastructure() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1"], range(1, 21))
    for s, (backlog, age) in enumerate([(100, 8_000), (400, 12_000), (900, 16_000)]):
        mon.observe_lane("digits", "batch", T0 + (18 + s) * SEC, backlog, age)
    h = mon.assess(T0 + 20 * SEC)[("digits", "1")]
    assert h.state == "degraded-infra" and h.infra and not h.model
    assert h.reasons == [
        "infrastructure: lane digits/batch lag 16 s and growing, backlog 100 -> 900 records "
        "(threshold 10 s)"
    ]


def test_old_but_draining_lane_is_not_a_problem() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1"], range(1, 21))
    mon.observe_lane("digits", "batch", T0 + 18 * SEC, 900, 30_000)
    mon.observe_lane("digits", "batch", T0 + 20 * SEC, 100, 12_000)
    assert mon.assess(T0 + 20 * SEC)[("digits", "1")].state == "healthy"


def test_expired_share_is_infrastructure() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1"], range(1, 21))
    for s in range(11, 21):
        mon.observe(answers(T0 + s * SEC, ok=80, expired=20))
    h = mon.assess(T0 + 20 * SEC)[("digits", "1")]
    assert h.state == "degraded-infra"
    assert h.reasons == [
        "infrastructure: expired 20% of 1000 answers over the last 10 s (threshold 5%)"
    ]


def test_too_few_answers_are_not_judged() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1"], range(1, 21))
    mon.observe(answers(T0 + 20 * SEC, ok=5, expired=5))
    assert mon.assess(T0 + 20 * SEC)[("digits", "1")].state == "healthy"


def test_cuda_version_on_cpu_is_execution_provider_fallback() -> None:
    mon = HealthMonitor(THRESHOLDS, preferred_providers={("digits", "1"): "cuda"})
    run(mon, ["w1"], range(1, 11))
    h = mon.assess(T0 + 10 * SEC)[("digits", "1")]
    assert h.state == "degraded-infra"
    assert h.reasons == [
        "infrastructure: execution provider fallback: digits:1 prefers cuda, worker w1 runs "
        "it on CPUExecutionProvider"
    ]
    # On CUDA, or with no preference for it, nothing is wrong.
    mon2 = HealthMonitor(THRESHOLDS, preferred_providers={("digits", "1"): "cuda"})
    run(mon2, ["w1"], range(1, 11), provider="CUDAExecutionProvider")
    assert mon2.assess(T0 + 10 * SEC)[("digits", "1")].state == "healthy"
    mon3 = HealthMonitor(THRESHOLDS, preferred_providers={("digits", "1"): "auto"})
    run(mon3, ["w1"], range(1, 11))
    assert mon3.assess(T0 + 10 * SEC)[("digits", "1")].state == "healthy"


def test_broker_errors_are_infrastructure_until_they_age_out() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1"], range(1, 11))
    mon.observe_broker_error("cannot reach 127.0.0.1:9092", T0 + 9 * SEC)
    h = mon.assess(T0 + 10 * SEC)[("digits", "1")]
    assert h.reasons == ["infrastructure: broker error: cannot reach 127.0.0.1:9092"]
    run(mon, ["w1"], range(11, 21))
    assert mon.assess(T0 + 20 * SEC)[("digits", "1")].state == "healthy"


def test_infra_and_model_causes_together() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1", "w2"], range(1, 11))
    run(mon, ["w1"], range(11, 21), counts=SKEWED)
    h = mon.assess(T0 + 20 * SEC)[("digits", "1")]
    assert h.state == "degraded-infra" and h.infra and h.model
    assert [r.split(":")[0] for r in h.reasons] == ["infrastructure", "model degradation"]


def test_models_are_judged_apart() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1"], range(1, 21), model="digits")
    run(mon, ["w2"], range(1, 11), model="other")
    healths = mon.assess(T0 + 20 * SEC)
    assert healths[("digits", "1")].state == "healthy"
    assert healths[("other", "1")].state == "down"
    assert "worker w2" in healths[("other", "1")].reason
    assert mon.pools() == {"default": {"digits", "other"}}
    assert mon.known_versions() == [("digits", "1"), ("other", "1")]


def test_assessing_repeatedly_over_time_keeps_state_right() -> None:
    # A long-running monitor (the stats process) assesses every second; pruning must not
    # lose the reference nor the earlier invalid-input share.
    mon = HealthMonitor(THRESHOLDS)
    states = []
    for s in range(1, 61):
        skewed = s > 40
        mon.observe(beat("w1", T0 + s * SEC, counts=SKEWED if skewed else UNIFORM))
        mon.observe(answers(T0 + s * SEC))
        states.append(mon.assess(T0 + s * SEC)[("digits", "1")].state)
    assert set(states[:40]) == {"healthy"}
    assert states[-1] == "degraded-model"


def test_thresholds_from_settings() -> None:
    s = Settings(health_heartbeat_timeout_ms=1500, health_window_s=30, drift_psi_threshold=0.3,
                 drift_reference_rows=42)
    t = HealthThresholds.from_settings(s)
    assert (t.heartbeat_timeout_ms, t.window_ms, t.psi, t.reference_rows) == (
        1500, 30_000, 0.3, 42)
    assert HealthThresholds.from_settings(s, window_s=5).window_ms == 5000
    assert t.drift.psi == 0.3


def test_gauges_follow_the_assessment() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1"], range(1, 11))
    run(mon, ["w1"], range(11, 21), counts=SKEWED)
    m = Metrics()
    healths = mon.assess(T0 + 20 * SEC)
    export_gauges(m, healths)
    psi = healths[("digits", "1")].drift.psi  # type: ignore[union-attr]
    labels = {"model": "digits", "version": "1", "pool": "default"}
    assert m.registry.get_sample_value("inferline_output_drift_psi", labels) == psi
    for state, value in [("degraded-model", 1.0), ("healthy", 0.0), ("down", 0.0)]:
        assert m.registry.get_sample_value(
            "inferline_model_health", {**labels, "state": state}) == value
    # The worker gone: the gauges move to down.
    export_gauges(m, mon.assess(T0 + 30 * SEC))
    assert m.registry.get_sample_value(
        "inferline_model_health", {**labels, "state": "down"}) == 1.0


def test_lost_workers_fade_from_the_reasons() -> None:
    mon = HealthMonitor(THRESHOLDS)
    run(mon, ["w1", "w2"], range(1, 11))
    run(mon, ["w1"], range(11, 31))  # w2 lost at 10 s; the window is 10 s
    assert "worker w2" in mon.assess(T0 + 20 * SEC)[("digits", "1")].reason
    assert mon.assess(T0 + 30 * SEC)[("digits", "1")].state == "healthy"
    # Alone, a lost worker stays the reason its version is down...
    mon2 = HealthMonitor(HealthThresholds(window_ms=10 * SEC, forget_worker_ms=60 * SEC))
    run(mon2, ["w1"], range(1, 11))
    assert "worker w1" in mon2.assess(T0 + 50 * SEC)[("digits", "1")].reason
    # ...until it is forgotten; the version is still down, for want of any worker.
    h = mon2.assess(T0 + 80 * SEC)[("digits", "1")]
    assert h.state == "down"
    assert h.reasons == ["infrastructure: no worker has announced digits:1 (no heartbeat seen)"]
