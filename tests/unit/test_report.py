"""pipeline.report: per model/priority summaries of responses."""

from __future__ import annotations

import math

import pytest

from pipeline.report import Row, summarise
from schemas import InferenceResponse


def _resp(
    model: str, status: str = "ok", batch_size: int = 0, cost_usd: float = 0.0
) -> InferenceResponse:
    return InferenceResponse.model_validate(
        {
            "id": "r",
            "model": model,
            "status": status,
            "batch_size": batch_size,
            "cost_usd": cost_usd,
        }
    )


def _sample() -> list[tuple[InferenceResponse, str, float, float]]:
    return [
        # digits/high: three ok (latency 10, 20, 40 ms), one expired, one error.
        (_resp("digits", "ok", 2, 1e-6), "high", 1000.0, 1010.0),
        (_resp("digits", "ok", 4, 2e-6), "high", 1005.0, 1025.0),
        (_resp("digits", "ok", 6, 3e-6), "high", 1100.0, 1140.0),
        (_resp("digits", "expired"), "high", 1200.0, 1300.0),
        (_resp("digits", "error"), "high", 900.0, 905.0),
        # digits/batch: one ok, one rejected.
        (_resp("digits", "ok", 64, 5e-7), "batch", 0.0, 500.0),
        (_resp("digits", "rejected"), "batch", 10.0, 11.0),
        # minilm/normal: two ok.
        (_resp("minilm", "ok", 8, 4e-6), "normal", 0.0, 100.0),
        (_resp("minilm", "ok", 8, 4e-6), "normal", 0.0, 300.0),
        # A response whose request could not be read names no model.
        (_resp("", "error"), "normal", 50.0, 60.0),
    ]


def _by_key(rows: list[Row]) -> dict[tuple[str, str], Row]:
    return {(r.model, r.priority): r for r in rows}


def test_groups_by_model_and_priority_in_sorted_order() -> None:
    rows = summarise(_sample())
    assert [(r.model, r.priority) for r in rows] == [
        ("(unreadable)", "normal"),
        ("digits", "batch"),
        ("digits", "high"),
        ("minilm", "normal"),
    ]


def test_counts_statuses() -> None:
    rows = _by_key(summarise(_sample()))
    high = rows["digits", "high"]
    assert high.count == 5
    assert dict(high.statuses) == {"ok": 3, "expired": 1, "error": 1}
    assert dict(rows["digits", "batch"].statuses) == {"ok": 1, "rejected": 1}
    assert rows["minilm", "normal"].count == 2
    assert dict(rows["(unreadable)", "normal"].statuses) == {"error": 1}


def test_latency_percentiles_of_ok_responses() -> None:
    high = _by_key(summarise(_sample()))["digits", "high"]
    assert sorted(high.latencies_ms) == [10.0, 20.0, 40.0]
    assert high.percentile_ms(50) == pytest.approx(20.0)
    assert high.percentile_ms(0) == pytest.approx(10.0)
    assert high.percentile_ms(100) == pytest.approx(40.0)
    # Linear interpolation: rank 0.99 * 2 = 1.98 -> 20 + 0.98 * (40 - 20).
    assert high.percentile_ms(99) == pytest.approx(39.6)


def test_mean_batch_size_and_cost_per_1000_count_ok_responses_only() -> None:
    rows = _by_key(summarise(_sample()))
    high = rows["digits", "high"]
    assert high.mean_batch_size == pytest.approx(4.0)
    assert high.cost_usd == pytest.approx(6e-6)
    assert high.cost_per_1000_usd == pytest.approx(1000 * 6e-6 / 3)
    minilm = rows["minilm", "normal"]
    assert minilm.mean_batch_size == 8.0
    assert minilm.cost_per_1000_usd == pytest.approx(4e-3)
    assert minilm.percentile_ms(50) == pytest.approx(200.0)


def test_throughput_over_the_group_span() -> None:
    rows = _by_key(summarise(_sample()))
    high = rows["digits", "high"]
    assert (high.first_ms, high.last_ms) == (900.0, 1300.0)
    assert high.throughput_per_s == pytest.approx(5 / 0.4)
    assert rows["minilm", "normal"].throughput_per_s == pytest.approx(2 / 0.3)


def test_group_without_ok_responses() -> None:
    row = _by_key(summarise(_sample()))["(unreadable)", "normal"]
    assert math.isnan(row.percentile_ms(50))
    assert row.mean_batch_size == 0.0
    assert row.cost_per_1000_usd == 0.0
    assert row.latencies_ms == []


def test_zero_span_gives_zero_throughput() -> None:
    rows = summarise([(_resp("m", "ok", 1), "high", 5.0, 5.0)])
    assert rows[0].throughput_per_s == 0.0
    assert rows[0].percentile_ms(50) == 0.0


def test_nothing_to_summarise() -> None:
    assert summarise([]) == []
