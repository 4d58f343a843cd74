"""bench.results: the ratio and target verdict every bench script prints."""

from __future__ import annotations

import math

from bench.results import ratio, verdict


def test_ratio_divides_and_is_nan_without_a_positive_denominator() -> None:
    assert ratio(930.0, 1_000.0) == 0.93
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(1.0, -2.0))
    assert math.isnan(ratio(None, 2.0))
    assert math.isnan(ratio(1.0, None))
    assert math.isnan(ratio(float("nan"), 2.0))


def test_verdict_says_met_at_the_target_and_na_for_nan() -> None:
    assert verdict(0.9, 0.9) == "met"
    assert verdict(0.899, 0.9) == "not met"
    assert verdict(17.6, 2.0) == "met"
    assert verdict(float("nan"), 0.9) == "n/a"
