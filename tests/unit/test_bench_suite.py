"""The bench plan's minilm runs, sized by raw ONNX Runtime's measured rate; raw's inputs."""

from __future__ import annotations

import argparse

import numpy as np

from bench.suite import MINILM_RUN_S, Plan, digits_batch


def plan(quick: bool = False) -> Plan:
    return Plan.of(argparse.Namespace(quick=quick, intra_op_threads=2, instances=2,
                                      concurrency=256))


def test_minilm_runs_last_about_the_planned_seconds_at_raws_rate() -> None:
    p = plan()
    fast = p.sized_for(1_050.0)
    assert fast.minilm_requests == 10_000
    assert abs(fast.minilm_requests / 1_050.0 - MINILM_RUN_S) < 1.0
    # The dedicated-core runs compute on half the cores: half the texts.
    assert fast.dedicated_requests == fast.minilm_requests // 2
    # Everything else is left as planned.
    assert fast.digits_requests == p.digits_requests and fast.warmup == p.warmup


def test_minilm_runs_never_shrink_below_the_plan_and_quick_plans_stay() -> None:
    p = plan()
    slow = p.sized_for(100.0)
    assert (slow.minilm_requests, slow.dedicated_requests) == (
        p.minilm_requests, p.dedicated_requests)
    q = plan(quick=True)
    assert q.sized_for(5_000.0) == q


def test_digits_batches_turn_through_the_rows_as_contiguous_float32() -> None:
    x = np.arange(5 * 2, dtype=np.float64).reshape(5, 2)
    batch = digits_batch(x)(4, 3)["input"]
    assert batch.dtype == np.float32 and batch.flags.c_contiguous
    # Rows 3, 4, then round to 0, 1.
    np.testing.assert_array_equal(batch, x[[3, 4, 0, 1]].astype(np.float32))
