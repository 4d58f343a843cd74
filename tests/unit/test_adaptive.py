"""The learned compute model and the batch policy, with made-up timings."""

from __future__ import annotations

import pytest

from pipeline.adaptive import ArrivalRate, BatchPolicy, ComputeModel


def test_compute_model_learns_an_affine_cost() -> None:
    model = ComputeModel()
    for _ in range(30):
        for rows in (1, 8, 32, 64):
            model.observe(rows, 0.002 + 0.0001 * rows)
    assert model.fixed_s == pytest.approx(0.002, rel=1e-3)
    assert model.per_row_s == pytest.approx(0.0001, rel=1e-3)
    assert model.predict(10) == pytest.approx(0.003, rel=1e-3)


def test_compute_model_follows_a_slower_machine() -> None:
    model = ComputeModel()
    for _ in range(50):
        for rows in (1, 64):
            model.observe(rows, 0.001 + 0.00001 * rows)
    before = model.predict(64)
    for _ in range(200):
        for rows in (1, 64):
            model.observe(rows, 2 * (0.001 + 0.00001 * rows))
    assert model.predict(64) == pytest.approx(2 * before, rel=0.05)


def test_compute_model_with_one_batch_size_keeps_a_line_through_it() -> None:
    model = ComputeModel(fixed_s=0.001, per_row_s=0.0001)
    for _ in range(10):
        model.observe(16, 0.01)
    assert model.predict(16) == pytest.approx(0.01, rel=1e-6)


def test_compute_model_ignores_nonsense() -> None:
    model = ComputeModel(fixed_s=0.001, per_row_s=0.0001)
    model.observe(0, 1.0)
    model.observe(4, float("nan"))
    model.observe(4, -1.0)
    assert model.observations == 0
    assert model.predict(10) == pytest.approx(0.002)


def test_max_rows_within() -> None:
    model = ComputeModel(fixed_s=0.01, per_row_s=0.001)
    assert model.max_rows_within(0.005, 64) == 0
    assert model.max_rows_within(0.02, 64) == 10
    assert model.max_rows_within(10.0, 64) == 64


def test_arrival_rate_tracks_and_decays() -> None:
    rate = ArrivalRate(window_s=1.0)
    t = 0.0
    for _ in range(5000):
        t += 0.001
        rate.add(1, t)
    assert rate.current(t) == pytest.approx(1000, rel=0.05)
    assert rate.current(t + 3.0) < 0.06 * rate.current(t)


def policy(fixed_s: float = 0.002, per_row_s: float = 0.0001) -> BatchPolicy:
    return BatchPolicy(
        ComputeModel(fixed_s=fixed_s, per_row_s=per_row_s), max_batch_size=64, max_wait_ms=10
    )


def test_full_batch_runs_at_once() -> None:
    d = policy().decide(queued_rows=100, budget_s=1.0, oldest_wait_s=0, arrival_rows_per_s=0)
    assert (d.rows, d.wait_s) == (64, 0.0)


def test_waits_when_arrivals_fill_the_batch_in_time() -> None:
    # 1,000 rows/s: 54 more rows take 54 ms; the budget allows waiting 10 ms max_wait only.
    d = policy().decide(queued_rows=10, budget_s=1.0, oldest_wait_s=0, arrival_rows_per_s=100_000)
    assert d.rows == 0 and 0 < d.wait_s <= 0.01


def test_does_not_wait_for_rows_that_come_too_late() -> None:
    d = policy().decide(queued_rows=10, budget_s=1.0, oldest_wait_s=0, arrival_rows_per_s=1_000)
    assert d.rows == 10


def test_does_not_wait_when_nothing_arrives() -> None:
    d = policy().decide(queued_rows=3, budget_s=1.0, oldest_wait_s=0, arrival_rows_per_s=0)
    assert d.rows == 3


def test_tight_budget_runs_what_is_there() -> None:
    # 5 ms left: a full batch (8.4 ms) would miss it, 10 rows (3 ms) fit with no slack to wait.
    d = policy().decide(queued_rows=10, budget_s=0.005, oldest_wait_s=0,
                        arrival_rows_per_s=1_000_000)
    assert d.rows == 10


def test_waiting_never_exceeds_max_wait() -> None:
    d = policy().decide(queued_rows=10, budget_s=1.0, oldest_wait_s=0.0099,
                        arrival_rows_per_s=1_000_000)
    assert d.rows == 0 and d.wait_s <= 0.001
    d = policy().decide(queued_rows=10, budget_s=1.0, oldest_wait_s=0.011,
                        arrival_rows_per_s=1_000_000)
    assert d.rows == 10


def test_empty_lane_waits() -> None:
    d = policy().decide(queued_rows=0, budget_s=1.0, oldest_wait_s=0, arrival_rows_per_s=0)
    assert d.rows == 0
