"""pipeline.stats: log-bucketed latency sketches merge exactly and read quantiles closely."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.stats import GROWTH, MIN_MS, LatencySketch, bucket_of, bucket_value

# A quantile is a bucket's midpoint: within half a bucket's width of the exact value.
REL = (GROWTH - 1) / 2 + 1e-9


def _exact(values: np.ndarray, q: float) -> float:
    ordered = np.sort(values)
    return float(ordered[max(1, math.ceil(q * len(ordered))) - 1])


def test_bucket_bounds() -> None:
    assert bucket_of(0.0) == 0 and bucket_of(MIN_MS) == 0 and bucket_of(-5.0) == 0
    assert bucket_of(float("nan")) == 0
    for v in (0.02, 1.0, 7.3, 250.0, 12_345.0):
        i = bucket_of(v)
        assert MIN_MS * GROWTH**i <= v * (1 + 1e-12)
        assert v < MIN_MS * GROWTH ** (i + 1)
        assert abs(bucket_value(i) / v - 1) <= REL


@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_quantiles_of_known_samples(q: float) -> None:
    rng = np.random.default_rng(1)
    values = rng.lognormal(mean=2.0, sigma=1.0, size=5000)
    s = LatencySketch()
    s.add_array(values)
    got = s.quantile(q)
    assert got is not None
    assert abs(got / _exact(values, q) - 1) <= REL


def test_small_controlled_set() -> None:
    s = LatencySketch()
    for v in [10.0] * 98 + [500.0, 1000.0]:
        s.add(v)
    assert s.quantile(0.5) == pytest.approx(10.0, rel=REL)
    assert s.quantile(0.98) == pytest.approx(10.0, rel=REL)
    assert s.quantile(0.99) == pytest.approx(500.0, rel=REL)
    assert s.quantile(1.0) == 1000.0  # the maximum is kept exactly
    assert s.quantile(0.0) == 10.0  # and so is the minimum
    assert s.mean_ms == pytest.approx((98 * 10 + 1500) / 100)


def test_merge_equals_sketch_of_union() -> None:
    rng = np.random.default_rng(2)
    parts = [rng.exponential(scale=s, size=n) for s, n in ((5, 300), (50, 20), (0.5, 1000))]
    pieces = []
    for p in parts:
        sk = LatencySketch()
        for v in p:
            sk.add(float(v))
        pieces.append(sk)
    merged = LatencySketch.merged(pieces)
    whole = LatencySketch()
    whole.add_array(np.concatenate(parts))
    assert merged.counts == whole.counts
    assert merged.count == whole.count == 1320
    assert merged.sum_ms == pytest.approx(whole.sum_ms)
    assert (merged.min_ms, merged.max_ms) == (whole.min_ms, whole.max_ms)
    for q in (0.5, 0.95, 0.99):
        assert merged.quantile(q) == whole.quantile(q)


def test_add_and_add_array_agree() -> None:
    values = np.array([0.0, 0.005, 0.3, 3.0, 3.0, 99.9, 2e6])
    a, b = LatencySketch(), LatencySketch()
    for v in values:
        a.add(float(v))
    b.add_array(values)
    assert a.counts == b.counts


def test_wire_form_round_trip() -> None:
    s = LatencySketch()
    s.add_array(np.array([1.0, 2.0, 3.0]))
    data = s.to_data()
    back = LatencySketch.from_data(data.model_dump(mode="json"))
    assert back.counts == s.counts and back.count == 3
    assert back.quantile(0.5) == s.quantile(0.5)


def test_empty_sketch() -> None:
    s = LatencySketch()
    assert s.quantile(0.99) is None and s.mean_ms is None
    assert LatencySketch.from_data(s.to_data()).count == 0
    with pytest.raises(ValueError, match=r"q=1\.5"):
        s.quantile(1.5)
