"""pipeline.cost: each message pays its rows' share of its batch's compute time."""

from __future__ import annotations

import math

import pytest

from pipeline.cost import cost_per_1000_usd, message_cost_usd


def test_formula_on_concrete_numbers() -> None:
    # $3.60/h is $0.001/s; 2 s of compute is $0.002 for the batch; 1 row of 4 pays a quarter.
    assert message_cost_usd(3.60, 2.0, 1, 4) == pytest.approx(0.0005)
    # $0.10/h for 25 ms, 3 rows of a 64-row batch.
    assert message_cost_usd(0.10, 0.025, 3, 64) == pytest.approx(0.10 / 3600 * 0.025 * 3 / 64)
    assert message_cost_usd(0.10, 0.025, 3, 64) == pytest.approx(3.2552083e-8)


def test_whole_batch_pays_full_compute() -> None:
    assert message_cost_usd(7.2, 0.5, 8, 8) == pytest.approx(0.001)


def test_free_hardware_or_no_compute_costs_nothing() -> None:
    assert message_cost_usd(0.0, 1.0, 1, 1) == 0.0
    assert message_cost_usd(1.0, 0.0, 1, 1) == 0.0


@pytest.mark.parametrize("rows", [[1, 3, 2], [1] * 64, [5, 7, 11, 13, 17, 19]])
def test_shares_of_one_batch_sum_to_the_batch_cost(rows: list[int]) -> None:
    hourly, compute_s = 2.48, 0.0371
    batch_rows = sum(rows)
    batch_cost = hourly / 3600 * compute_s
    shares = [message_cost_usd(hourly, compute_s, r, batch_rows) for r in rows]
    assert math.fsum(shares) == pytest.approx(batch_cost, rel=1e-12)
    # Bigger members pay proportionally more.
    for r, share in zip(rows, shares, strict=True):
        assert share == pytest.approx(batch_cost * r / batch_rows, rel=1e-12)


@pytest.mark.parametrize(
    ("hourly", "compute_s", "rows", "batch_rows", "match"),
    [
        (-0.01, 1.0, 1, 1, "hourly_usd=-0.01"),
        (1.0, -0.5, 1, 1, "compute_s=-0.5"),
        (1.0, 1.0, 0, 4, "rows=0"),
        (1.0, 1.0, -1, 4, "rows=-1"),
        (1.0, 1.0, 5, 4, "batch_rows=4"),
        (1.0, 1.0, 1, 0, "batch_rows=0"),
    ],
)
def test_invalid_arguments(
    hourly: float, compute_s: float, rows: int, batch_rows: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        message_cost_usd(hourly, compute_s, rows, batch_rows)


def test_cost_per_1000() -> None:
    assert cost_per_1000_usd(0.5, 250) == pytest.approx(2.0)
    assert cost_per_1000_usd(0.0, 10) == 0.0
    assert cost_per_1000_usd(1.0, 0) == 0.0
