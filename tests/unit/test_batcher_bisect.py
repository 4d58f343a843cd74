"""pipeline.batcher: a batch that fails on one member's inputs is bisected.

The batch functions here really compute and really fail on a poison value (a
negative number, or an out-of-range index in a real ONNX model), so the members
that succeed are checked against the values they must get. No wall-clock bounds:
every test awaits futures, and a huge ``max_wait_ms`` makes a test hang (and
pytest-timeout fail it) if it would depend on waiting.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.batcher import BatchResult, DynamicBatcher
from pipeline.errors import InferenceFailed
from pipeline.registry import ModelVersion, TensorSpec
from pipeline.session import ModelSession

pytestmark = pytest.mark.timeout(60)

HUGE_WAIT_MS = 60_000.0
Arrays = dict[str, np.ndarray[Any, Any]]


class Poisoned:
    """Doubles its input, and fails a batch in which any value is negative.

    Records, per call, the member ids it ran (the first column of each row, which
    the tests set to the member's index).
    """

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, inputs: Arrays) -> tuple[Arrays, float]:
        x = inputs["x"]
        self.calls.append([int(abs(v)) for v in x[:, 0]])
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)  # a real batch function yields to the loop
        if (x < 0).any():
            raise RuntimeError(f"negative input in a batch of {len(x)}")
        return {"doubled": x * 2, "total": x.sum(axis=1)}, 0.001 * len(x)

    @property
    def batch_rows(self) -> list[int]:
        return [len(c) for c in self.calls]


def _member(i: int, rows: int = 1, *, poison: bool = False) -> Arrays:
    """``rows`` rows for member ``i``: [i, 1, 2], [i, 2, 3], ...; negated when poisoned."""
    x = np.array([[i, r + 1, r + 2] for r in range(rows)], dtype=np.float32)
    return {"x": -x if poison else x}


async def _submit_all(
    batcher: DynamicBatcher, members: list[Arrays]
) -> list[BatchResult | BaseException]:
    futures = [batcher.submit(m, len(m["x"])) for m in members]
    batcher.flush()
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert all(f.done() for f in futures)
    return outcomes


def _assert_ok(outcome: BatchResult | BaseException, member: Arrays) -> BatchResult:
    assert isinstance(outcome, BatchResult), outcome
    np.testing.assert_array_equal(outcome.outputs["doubled"], member["x"] * 2)
    np.testing.assert_array_equal(outcome.outputs["total"], member["x"].sum(axis=1))
    assert outcome.rows == len(member["x"])
    return outcome


def _assert_failed(outcome: BatchResult | BaseException, rows: int = 1) -> None:
    assert isinstance(outcome, InferenceFailed), outcome
    assert "model 'm:1'" in str(outcome)
    assert f"failed on a batch of {rows}: RuntimeError: negative input" in str(outcome)


# --- fake model ------------------------------------------------------------------------------


async def test_one_poisoned_member_among_eight_fails_alone() -> None:
    fn = Poisoned()
    members = [_member(i, poison=i == 5) for i in range(8)]
    async with DynamicBatcher(
        fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS, name="m:1"
    ) as batcher:
        outcomes = await _submit_all(batcher, members)
    _assert_failed(outcomes[5])
    ok = {i: _assert_ok(outcomes[i], members[i]) for i in range(8) if i != 5}
    # 8 fails -> [0-3] ok, [4-7] fails -> [4,5] fails, [6,7] ok -> [4] ok, [5] fails.
    assert fn.calls == [
        [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5], [4], [5], [6, 7]
    ]
    assert batcher.bisections == 3
    assert batcher.batches_run == 3
    assert batcher.rows_run == 7
    # Each result reports the sub-batch that actually ran it, so cost is per real run.
    for i, r in ok.items():
        size = 4 if i < 4 else (1 if i == 4 else 2)
        assert (r.batch_rows, r.batch_members) == (size, size)
        assert r.compute_s == pytest.approx(0.001 * size)
        assert r.batch_wait_s >= 0
    charged = sum(r.compute_s * r.share for r in ok.values())
    assert charged == pytest.approx(0.004 + 0.002 + 0.001)


async def test_two_poisoned_members() -> None:
    fn = Poisoned()
    bad = {1, 6}
    members = [_member(i, poison=i in bad) for i in range(8)]
    async with DynamicBatcher(
        fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS, name="m:1"
    ) as batcher:
        outcomes = await _submit_all(batcher, members)
    for i, outcome in enumerate(outcomes):
        if i in bad:
            _assert_failed(outcome)
        else:
            _assert_ok(outcome, members[i])
    # Every member ran in exactly one successful run or failed in exactly one single run.
    singles = [c[0] for c in fn.calls if len(c) == 1]
    assert sorted(singles) == [0, 1, 6, 7]
    assert batcher.bisections == 5  # 8, [0-3], [4-7], [0,1], [6,7]
    assert batcher.rows_run == 6


async def test_all_poisoned_members_each_fail() -> None:
    fn = Poisoned()
    members = [_member(i, poison=True) for i in range(8)]
    async with DynamicBatcher(
        fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS, name="m:1"
    ) as batcher:
        outcomes = await _submit_all(batcher, members)
    for outcome in outcomes:
        _assert_failed(outcome)
    assert len({id(o) for o in outcomes}) == 8  # each its own error from its own run
    assert batcher.bisections == 7
    assert len(fn.calls) == 15  # the full binary tree: 2 * 8 - 1 runs
    assert batcher.batches_run == 0
    assert batcher.failed_members == 8


async def test_single_member_batch_failing_is_not_bisected() -> None:
    fn = Poisoned()
    member = {"x": np.concatenate([_member(0, 2)["x"], _member(0, poison=True)["x"]])}
    async with DynamicBatcher(
        fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS, name="m:1"
    ) as batcher:
        (outcome,) = await _submit_all(batcher, [member])
    # A request is atomic: its three rows are never split apart.
    _assert_failed(outcome, rows=3)
    assert fn.batch_rows == [3]
    assert batcher.bisections == 0
    assert batcher.failed_members == 1


async def test_multi_row_members_are_bisected_by_member() -> None:
    fn = Poisoned()
    sizes = [2, 3, 1, 2]
    members = [_member(i, n, poison=i == 1) for i, n in enumerate(sizes)]
    async with DynamicBatcher(
        fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS, name="m:1"
    ) as batcher:
        outcomes = await _submit_all(batcher, members)
    _assert_failed(outcomes[1], rows=3)
    assert _assert_ok(outcomes[0], members[0]).batch_rows == 2
    for i in (2, 3):
        r = _assert_ok(outcomes[i], members[i])
        assert (r.batch_rows, r.batch_members) == (3, 2)
    assert fn.batch_rows == [8, 5, 2, 3, 3]
    assert batcher.bisections == 2


async def test_bisection_finishes_before_the_next_batch_runs() -> None:
    # One slot: the halves of a failed batch are its own runs, not queued behind others.
    fn = Poisoned()
    members = [_member(i, poison=i == 1) for i in range(8)]
    async with DynamicBatcher(
        fn, max_batch_size=4, max_wait_ms=HUGE_WAIT_MS, name="m:1"
    ) as batcher:
        outcomes = await _submit_all(batcher, members)
    _assert_failed(outcomes[1])
    for i in set(range(8)) - {1}:
        _assert_ok(outcomes[i], members[i])
    assert fn.calls == [[0, 1, 2, 3], [0, 1], [0], [1], [2, 3], [4, 5, 6, 7]]


async def test_member_cancelled_during_a_failed_run_is_left_out_of_the_halves() -> None:
    fn = Poisoned()
    fn.gate = asyncio.Event()
    members = [_member(i, poison=i == 3) for i in range(4)]
    async with DynamicBatcher(
        fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS, name="m:1"
    ) as batcher:
        futures = [batcher.submit(m, 1) for m in members]
        batcher.flush()
        for _ in range(1000):
            if fn.calls:
                break
            await asyncio.sleep(0)
        assert fn.calls == [[0, 1, 2, 3]]
        futures[0].cancel()
        fn.gate.set()
        outcomes = await asyncio.gather(*futures[1:], return_exceptions=True)
    _assert_ok(outcomes[0], members[1])
    _assert_ok(outcomes[1], members[2])
    _assert_failed(outcomes[2])
    assert all(0 not in c for c in fn.calls[1:])
    assert fn.calls == [[0, 1, 2, 3], [1], [2, 3], [2], [3]]


# --- a real ONNX model that fails at run time on one input value ------------------------------

TABLE = np.arange(40, dtype=np.float32).reshape(10, 4)


def _lookup_model(path: Path) -> ModelVersion:
    """``row = table[index]``: ONNX Runtime raises on an index outside [-10, 9]."""
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "index"], ["gathered"], axis=0),
            helper.make_node("Squeeze", ["gathered", "axes"], ["row"]),
        ],
        "lookup",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("row", TensorProto.FLOAT, ["N", 4])],
        initializer=[
            numpy_helper.from_array(TABLE, "table"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # ONNX Runtime 1.31 refuses newer IR versions
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return ModelVersion(
        name="lookup",
        version="1",
        path=path,
        inputs=(TensorSpec(name="index", datatype="INT64", shape=(-1, 1)),),
        outputs=(TensorSpec(name="row", datatype="FP32", shape=(-1, 4)),),
        max_batch_size=16,
        max_wait_ms=5,
        execution_provider="cpu",
        sha256=None,
    )


async def test_real_onnx_model_failing_on_one_input_is_bisected(tmp_path: Path) -> None:
    spec = _lookup_model(tmp_path / "lookup.onnx")
    indices = [0, 1, 2, 1000, 4, 5, 6, 7]
    with ModelSession(spec, provider="cpu") as session:
        # Precondition: ONNX Runtime itself rejects the out-of-range index.
        with pytest.raises(InferenceFailed, match="idx=1000"):
            session.run({"index": np.array([[1000]], dtype=np.int64)})
        batcher = DynamicBatcher(
            session.run_async,
            max_batch_size=spec.max_batch_size,
            max_wait_ms=spec.max_wait_ms,
            name=spec.key,
        )
        async with batcher:
            futures = [
                batcher.submit({"index": np.array([[i]], dtype=np.int64)}, 1) for i in indices
            ]
            batcher.flush()
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
    bad = outcomes[3]
    assert isinstance(bad, InferenceFailed)
    assert "model 'lookup' version '1' failed on a batch of 1" in str(bad)
    assert "idx=1000" in str(bad)
    ok = [o for k, o in enumerate(outcomes) if k != 3]
    for i, r in zip([0, 1, 2, 4, 5, 6, 7], ok, strict=True):
        assert isinstance(r, BatchResult), r
        np.testing.assert_array_equal(r.outputs["row"], TABLE[i][None, :])
        assert r.compute_s > 0
    assert batcher.bisections == 3
    assert batcher.batches_run == 3
    assert batcher.rows_run == 7
