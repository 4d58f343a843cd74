"""Canary routing, shadow pairs and the windowed verdict, without a broker."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline.registry import ModelEntry, ModelVersion, RolloutPolicy, TensorSpec
from pipeline.rollout import (
    BUCKETS,
    Figures,
    ModelPlan,
    RolloutTracker,
    agreement,
    basis_points,
    buckets,
    comparison,
    judge,
    next_step,
)


def test_buckets_are_stable_in_range_and_independent() -> None:
    assert buckets("req-1") == buckets("req-1")
    ids = [f"req-{i}" for i in range(20_000)]
    all_b = np.array([buckets(i) for i in ids])
    assert all_b.min() >= 0 and all_b.max() < BUCKETS
    # Each of the three buckets is close to uniform: 10 deciles of ~2,000 ids each.
    for k in range(3):
        counts = np.bincount(all_b[:, k] * 10 // BUCKETS, minlength=10)
        assert counts.min() > 1_800 and counts.max() < 2_200, counts
    # ... and the canary bucket tells nothing about the shadow or sample bucket.
    corr = np.corrcoef(all_b.T)
    assert abs(corr[0, 1]) < 0.03 and abs(corr[0, 2]) < 0.03 and abs(corr[1, 2]) < 0.03


@pytest.mark.parametrize("percent", [5.0, 25.0, 50.0])
def test_canary_share_is_within_binomial_tolerance(percent: float) -> None:
    plan = ModelPlan("m", "1", candidate="2", canary_percent=percent, warm={"1", "2"})
    n = 20_000
    ids = [uuid.uuid4().hex for _ in range(n)]
    share = sum(plan.route(i).version == "2" for i in ids) / n
    p = percent / 100
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(share - p) < 5 * sigma, (share, p)


def test_routes_are_sticky_per_id_and_grow_monotonically() -> None:
    ids = [f"id-{i}" for i in range(5_000)]
    at = {
        pct: {i for i in ids
              if ModelPlan("m", "1", candidate="2", canary_percent=pct,
                           warm={"1", "2"}).route(i).version == "2"}
        for pct in (5.0, 25.0, 50.0)
    }
    # Raising the percentage only moves requests to the candidate, never back.
    assert at[5.0] <= at[25.0] <= at[50.0]
    assert basis_points(12.34) == 1234


def test_no_rollout_is_the_stable_route_without_hashing() -> None:
    plan = ModelPlan("m", "1", warm={"1"})
    route = plan.route("anything")
    assert (route.version, route.arm, route.copy, route.shadow, route.cold) == (
        "1", "stable", False, None, False)
    assert plan.explicit("7").version == "7" and plan.explicit("7").cold


def test_cold_candidate_is_held_or_rerouted_per_policy() -> None:
    ids = [f"r{i}" for i in range(400)]
    hold = ModelPlan("m", "1", candidate="2", canary_percent=50, warm={"1"}, policy="hold")
    stable = ModelPlan("m", "1", candidate="2", canary_percent=50, warm={"1"}, policy="stable")
    held = [hold.route(i) for i in ids]
    rerouted = [stable.route(i) for i in ids]
    to_candidate = [r for r in held if r.arm == "candidate"]
    assert to_candidate and all(r.cold and r.version == "2" for r in to_candidate)
    assert all(r.version == "1" and not r.cold for r in rerouted)
    assert sum(r.rerouted_from == "2" for r in rerouted) == len(to_candidate)
    # Policy stable cannot help when the stable version is cold as well: held.
    both_cold = ModelPlan("m", "1", candidate="2", canary_percent=50, warm=(), policy="stable")
    assert all(both_cold.route(i).cold for i in ids)


def test_shadow_mirrors_stable_requests_to_a_warm_candidate_and_copies_them() -> None:
    plan = ModelPlan("m", "1", candidate="2", shadow_percent=30, warm={"1", "2"})
    routes = [plan.route(f"s{i}") for i in range(3000)]
    assert all(r.version == "1" and r.arm == "stable" for r in routes)  # no canary share
    mirrored = [r for r in routes if r.shadow == "2"]
    assert 0.25 < len(mirrored) / len(routes) < 0.35
    assert all(r.copy for r in mirrored)  # the stable answer is needed for the pair
    cold = ModelPlan("m", "1", candidate="2", shadow_percent=30, warm={"1"})
    assert not any(cold.route(f"s{i}").shadow for i in range(300))


def test_sample_marks_both_arms() -> None:
    plan = ModelPlan("m", "1", candidate="2", canary_percent=50, sample_percent=20,
                     warm={"1", "2"})
    routes = [plan.route(f"x{i}") for i in range(4000)]
    for arm in ("stable", "candidate"):
        mine = [r for r in routes if r.arm == arm]
        assert 0.15 < sum(r.copy for r in mine) / len(mine) < 0.25


def test_next_step() -> None:
    steps = (5.0, 25.0, 50.0, 100.0)
    assert [next_step(steps, p) for p in (0, 5, 10, 25, 50)] == [5, 25, 25, 50, 100]


def test_agreement_labels_and_cosine() -> None:
    assert agreement("label", np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == (3.0, 4)
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    total, rows = agreement("cosine", a, np.array([[2.0, 0.0], [1.0, 0.0]]))
    assert rows == 2 and total == pytest.approx(1.0)
    assert agreement("label", np.array([1, 2]), np.array([1, 2, 3])) == (0.0, 2)


def _entry(outputs: tuple[TensorSpec, ...], **policy: object) -> ModelEntry:
    v = ModelVersion(name="m", version="1", path=Path("m.onnx"),
                     inputs=(TensorSpec(name="x", datatype="FP32", shape=(-1, 4)),),
                     outputs=outputs)
    return ModelEntry(name="m", default_version="1", versions=(v,),
                      rollout=RolloutPolicy.model_validate(policy))


def test_comparison_picks_labels_for_classifiers_and_cosine_for_embedders() -> None:
    digits = (TensorSpec(name="label", datatype="INT64", shape=(-1,)),
              TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 10)))
    minilm = (TensorSpec(name="embedding", datatype="FP32", shape=(-1, 384)),)
    assert comparison(_entry(digits)) == ("label", "label")
    assert comparison(_entry(minilm)) == ("embedding", "cosine")
    assert comparison(_entry(digits, agreement="cosine")) == ("probabilities", "cosine")
    assert comparison(_entry(digits, compare_output="probabilities")) == (
        "probabilities", "cosine")


def _figures(**kw: object) -> Figures:
    base: dict[str, object] = dict(
        stable_n=50, candidate_n=50, pairs=50, stable_error_rate=0.0, candidate_error_rate=0.0,
        stable_p99_ms=20.0, candidate_p99_ms=22.0, agreement=1.0, agreement_metric="label",
    )
    return Figures.model_validate({**base, **kw})


def test_judge_waits_for_full_windows() -> None:
    policy = RolloutPolicy()
    v = judge(policy, _figures(candidate_n=49), window=50, slo_p99_ms=200, needs_pairs=True)
    assert not v.ready and "49/50" in v.reason
    v = judge(policy, _figures(pairs=3), window=50, slo_p99_ms=200, needs_pairs=True)
    assert not v.ready and "3/50 shadow pairs" in v.reason
    assert judge(policy, _figures(pairs=3), window=50, slo_p99_ms=200, needs_pairs=False).ready


def test_judge_passes_a_good_candidate() -> None:
    v = judge(RolloutPolicy(), _figures(), window=50, slo_p99_ms=200, needs_pairs=True)
    assert v.ready and v.passed and "agreement 1.0000" in v.reason


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"candidate_error_rate": 0.1}, "error rate"),
        ({"agreement": 0.5}, "agreement 0.5000"),
        ({"candidate_p99_ms": 500.0}, "p99 500.0 ms"),
    ],
)
def test_judge_fails_on_each_threshold(change: dict[str, object], word: str) -> None:
    v = judge(RolloutPolicy(), _figures(**change), window=50, slo_p99_ms=200, needs_pairs=True)
    assert v.ready and not v.passed and word in v.reason


def test_slow_candidate_within_its_slo_is_not_failed_for_latency() -> None:
    v = judge(RolloutPolicy(), _figures(candidate_p99_ms=150.0, stable_p99_ms=20.0),
              window=50, slo_p99_ms=200, needs_pairs=True)
    assert v.passed, v.reason


def test_tracker_joins_shadow_pairs_and_restarts_the_candidate_window_per_step() -> None:
    t = RolloutTracker("r1", "1", "2", window=10, output="label", metric="label")
    for i in range(10):
        t.add(f"id{i}", "1", True, 10.0, {"label": np.array([i % 3])})
        # The candidate agrees on 8 of 10 requests.
        t.add(f"id{i}", "2", True, 12.0, {"label": np.array([i % 3 if i < 8 else 9])})
    t.add("other", "3", True, 1.0, None)  # neither arm: ignored
    f = t.figures()
    assert (f.stable_n, f.candidate_n, f.pairs) == (10, 10, 10)
    assert f.agreement == pytest.approx(0.8)
    assert f.stable_p99_ms == pytest.approx(10.0) and f.candidate_p99_ms == pytest.approx(12.0)
    t.add("bad", "2", False, None, None)
    assert t.figures().candidate_error_rate == pytest.approx(0.1)
    t.new_step()
    f = t.figures()
    assert (f.stable_n, f.candidate_n, f.pairs, f.agreement) == (10, 0, 0, None)


def test_rollout_policy_steps_must_rise_to_100() -> None:
    assert RolloutPolicy(steps=(10, 100)).steps == (10.0, 100.0)
    for bad in ((5, 25), (25, 5, 100), (0, 100), ()):
        with pytest.raises(ValueError, match="rollout steps"):
            RolloutPolicy(steps=bad)  # type: ignore[arg-type]
