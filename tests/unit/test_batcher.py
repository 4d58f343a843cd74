"""pipeline.batcher: dynamic batching with a real (if tiny) batch function; no wall-clock bounds.

Every test awaits futures rather than timing anything. A test that would only pass by
waiting for ``max_wait_ms`` uses a small one; a test that must not depend on it uses a
huge one, so that it hangs (and pytest-timeout fails it) if the batcher waits.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from pipeline.batcher import BatchResult, DynamicBatcher, check_outputs, concat
from pipeline.errors import InferenceFailed, InferlineError

pytestmark = pytest.mark.timeout(60)

HUGE_WAIT_MS = 60_000.0
Arrays = dict[str, np.ndarray[Any, Any]]


class Doubler:
    """A batch function that computes something checkable and records what it saw."""

    def __init__(self, *, fail_on_negative: bool = False, drop_row: bool = False) -> None:
        self.batch_rows: list[int] = []
        self.fail_on_negative = fail_on_negative
        self.drop_row = drop_row
        self.gate: asyncio.Event | None = None

    async def __call__(self, inputs: Arrays) -> tuple[Arrays, float]:
        x = inputs["x"]
        self.batch_rows.append(len(x))
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)  # a real batch function yields to the loop
        if self.fail_on_negative and (x < 0).any():
            raise RuntimeError(f"negative input in a batch of {len(x)}")
        doubled = x * 2
        total = x.sum(axis=1)
        if self.drop_row:
            total = total[:-1]
        return {"doubled": doubled, "total": total}, 0.001 * len(x)


def _rows(start: int, n: int, width: int = 3) -> dict[str, np.ndarray[Any, Any]]:
    """``n`` rows whose values identify them: row i is [10*(start+i), 10*(start+i)+1, ...]."""
    base = np.arange(start, start + n, dtype=np.float32)[:, None] * 10
    return {"x": base + np.arange(width, dtype=np.float32)}


async def _until(predicate: Any, what: str) -> None:
    """Yield to the loop until ``predicate()`` holds; bounded by loop turns, not time."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


# --- flushing --------------------------------------------------------------------------------


async def test_flushes_full_batches_of_exactly_max_batch_size() -> None:
    fn = Doubler()
    async with DynamicBatcher(fn, max_batch_size=4, max_wait_ms=HUGE_WAIT_MS) as batcher:
        futures = [batcher.submit(_rows(i, 1), 1) for i in range(12)]
        results = await asyncio.gather(*futures)
    assert fn.batch_rows == [4, 4, 4]
    assert [r.batch_rows for r in results] == [4] * 12
    assert [r.batch_members for r in results] == [4] * 12
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.outputs["doubled"], _rows(i, 1)["x"] * 2)
    assert batcher.batches_run == 3
    assert batcher.rows_run == 12


async def test_full_batches_of_multi_row_members() -> None:
    fn = Doubler()
    async with DynamicBatcher(fn, max_batch_size=4, max_wait_ms=HUGE_WAIT_MS) as batcher:
        futures = [batcher.submit(_rows(2 * i, 2), 2) for i in range(6)]
        results = await asyncio.gather(*futures)
    assert fn.batch_rows == [4, 4, 4]
    assert all(r.batch_members == 2 and r.share == 0.5 for r in results)


async def test_partial_batch_runs_after_max_wait() -> None:
    fn = Doubler()
    async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=1.0) as batcher:
        futures = [batcher.submit(_rows(i, 1), 1) for i in range(3)]
        results = await asyncio.gather(*futures)
    assert fn.batch_rows == [3]
    assert [r.batch_rows for r in results] == [3, 3, 3]
    assert all(r.batch_wait_s >= 0 for r in results)


async def test_flush_runs_a_partial_batch_without_waiting() -> None:
    fn = Doubler()
    async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS) as batcher:
        futures = [batcher.submit(_rows(i, 1), 1) for i in range(3)]
        batcher.flush()
        results = await asyncio.gather(*futures)
        assert fn.batch_rows == [3]
        # The flush is spent: the batcher serves the next flush as well.
        more = [batcher.submit(_rows(10 + i, 2), 2) for i in range(2)]
        batcher.flush()
        await asyncio.gather(*more)
    assert fn.batch_rows == [3, 4]
    assert [r.batch_members for r in results] == [3, 3, 3]


async def test_flush_with_more_than_one_batch_queued_runs_them_all() -> None:
    fn = Doubler()
    async with DynamicBatcher(fn, max_batch_size=4, max_wait_ms=HUGE_WAIT_MS) as batcher:
        futures = [batcher.submit(_rows(i, 1), 1) for i in range(10)]
        batcher.flush()
        await asyncio.gather(*futures)
    assert fn.batch_rows == [4, 4, 2]


async def test_batches_flushed_one_after_another_are_not_merged() -> None:
    fn = Doubler()
    async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS,
                              max_concurrent_batches=2) as batcher:
        # Two feeders' batches, both queued before the batcher's loop runs.
        first = [batcher.submit(_rows(i, 1), 1) for i in range(3)]
        batcher.flush()
        second = [batcher.submit(_rows(10 + i, 1), 1) for i in range(2)]
        batcher.flush()
        r1 = await asyncio.gather(*first)
        r2 = await asyncio.gather(*second)
    assert sorted(fn.batch_rows) == [2, 3]
    assert {r.batch_rows for r in r1} == {3}
    assert {r.batch_rows for r in r2} == {2}


async def test_member_that_does_not_fit_waits_for_the_next_batch() -> None:
    fn = Doubler()
    async with DynamicBatcher(fn, max_batch_size=4, max_wait_ms=HUGE_WAIT_MS) as batcher:
        a = batcher.submit(_rows(0, 3), 3)
        b = batcher.submit(_rows(3, 2), 2)
        batcher.flush()
        ra, rb = await asyncio.gather(a, b)
    assert fn.batch_rows == [3, 2]
    assert (ra.batch_rows, rb.batch_rows) == (3, 2)


async def test_flush_on_an_idle_batcher_is_harmless() -> None:
    fn = Doubler()
    async with DynamicBatcher(fn, max_batch_size=4, max_wait_ms=1.0) as batcher:
        batcher.flush()
        await asyncio.sleep(0)
        result = await batcher.submit(_rows(0, 1), 1)
    assert fn.batch_rows == [1]
    assert result.rows == 1


# --- splitting -------------------------------------------------------------------------------


async def test_multi_row_members_get_exactly_their_rows() -> None:
    fn = Doubler()
    sizes = [1, 3, 2]
    starts = [0, 1, 4]
    async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS) as batcher:
        futures = [batcher.submit(_rows(s, n), n) for s, n in zip(starts, sizes, strict=True)]
        batcher.flush()
        results = await asyncio.gather(*futures)
    assert fn.batch_rows == [6]
    for s, n, r in zip(starts, sizes, results, strict=True):
        x = _rows(s, n)["x"]
        assert r.rows == n
        assert r.batch_rows == 6
        assert r.batch_members == 3
        assert r.outputs["doubled"].shape == (n, 3)
        np.testing.assert_array_equal(r.outputs["doubled"], x * 2)
        np.testing.assert_array_equal(r.outputs["total"], x.sum(axis=1))
        assert r.share == pytest.approx(n / 6)
        assert r.compute_s == pytest.approx(0.006)
    assert sum(r.share for r in results) == pytest.approx(1.0)


async def test_cancelled_member_is_left_out_of_the_batch() -> None:
    fn = Doubler()
    async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS) as batcher:
        a = batcher.submit(_rows(0, 2), 2)
        b = batcher.submit(_rows(2, 3), 3)
        c = batcher.submit(_rows(5, 1), 1)
        b.cancel()
        batcher.flush()
        ra, rc = await asyncio.gather(a, c)
    assert fn.batch_rows == [3]
    np.testing.assert_array_equal(ra.outputs["doubled"], _rows(0, 2)["x"] * 2)
    np.testing.assert_array_equal(rc.outputs["doubled"], _rows(5, 1)["x"] * 2)
    assert ra.batch_members == rc.batch_members == 2


async def test_concurrent_batches_up_to_the_limit() -> None:
    fn = Doubler()
    fn.gate = asyncio.Event()
    batcher = DynamicBatcher(
        fn, max_batch_size=2, max_wait_ms=HUGE_WAIT_MS, max_concurrent_batches=2
    )
    async with batcher:
        futures = [batcher.submit(_rows(i, 1), 1) for i in range(6)]
        await _until(lambda: len(fn.batch_rows) == 2, "two batches running")
        for _ in range(20):
            await asyncio.sleep(0)
        assert fn.batch_rows == [2, 2]  # the third waits for a free slot
        fn.gate.set()
        await asyncio.gather(*futures)
    assert fn.batch_rows == [2, 2, 2]


# --- failures --------------------------------------------------------------------------------


async def test_batch_failure_fails_only_the_bad_member_and_the_next_batch_runs() -> None:
    # The batch is bisected (see test_batcher_bisect.py): the good member still succeeds.
    fn = Doubler(fail_on_negative=True)
    async with DynamicBatcher(
        fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS, name="digits:1"
    ) as batcher:
        bad = [batcher.submit(_rows(0, 2), 2), batcher.submit({"x": -_rows(1, 1)["x"]}, 1)]
        batcher.flush()
        ok, exc = await asyncio.gather(*bad, return_exceptions=True)
        assert isinstance(ok, BatchResult)
        np.testing.assert_array_equal(ok.outputs["doubled"], _rows(0, 2)["x"] * 2)
        assert (ok.batch_rows, ok.batch_members) == (2, 1)
        assert isinstance(exc, InferenceFailed)
        assert exc.code == "INTERNAL"
        assert "'digits:1'" in str(exc)
        assert "batch of 1" in str(exc)
        assert "RuntimeError: negative input in a batch of 1" in str(exc)
        good = [batcher.submit(_rows(5, 1), 1), batcher.submit(_rows(6, 2), 2)]
        batcher.flush()
        results = await asyncio.gather(*good)
    assert fn.batch_rows == [3, 2, 1, 3]
    np.testing.assert_array_equal(results[1].outputs["doubled"], _rows(6, 2)["x"] * 2)
    assert batcher.batches_run == 2
    assert batcher.rows_run == 5
    assert batcher.bisections == 1


async def test_inferline_errors_from_the_batch_pass_through_unwrapped() -> None:
    async def run(inputs: Arrays) -> tuple[Arrays, float]:
        await asyncio.sleep(0)
        raise InferlineError(f"device lost on {len(inputs['x'])} rows")

    async with DynamicBatcher(run, max_batch_size=4, max_wait_ms=HUGE_WAIT_MS) as batcher:
        futures = [batcher.submit(_rows(0, 1), 1), batcher.submit(_rows(1, 1), 1)]
        batcher.flush()
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert all(type(e) is InferlineError for e in outcomes)
    assert [str(e) for e in outcomes] == ["device lost on 2 rows"] * 2
    # Not about the inputs: the batch is not bisected.
    assert batcher.bisections == 0


async def test_output_with_wrong_row_count_fails_the_members() -> None:
    fn = Doubler(drop_row=True)
    async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS) as batcher:
        futures = [batcher.submit(_rows(0, 1), 1), batcher.submit(_rows(1, 3), 3)]
        batcher.flush()
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    # Treated like a failed run: bisected, and each member fails on its own run.
    assert fn.batch_rows == [4, 1, 3]
    for exc, rows, have in zip(outcomes, [1, 3], [0, 2], strict=True):
        assert isinstance(exc, InferenceFailed)
        assert f"output 'total' has shape [{have}], expected {rows} rows" in str(exc)
    assert batcher.batches_run == 0
    assert batcher.bisections == 1


async def test_submit_before_start_raises() -> None:
    batcher = DynamicBatcher(Doubler(), max_batch_size=4, max_wait_ms=1.0, name="m:1")
    with pytest.raises(InferlineError, match="batcher 'm:1' is not started"):
        batcher.submit(_rows(0, 1), 1)
    assert batcher.queued == 0


async def test_rows_over_max_batch_size_raises() -> None:
    async with DynamicBatcher(Doubler(), max_batch_size=4, max_wait_ms=1.0) as batcher:
        with pytest.raises(ValueError, match="rows=5 exceeds max_batch_size=4"):
            batcher.submit(_rows(0, 5), 5)
        assert batcher.queued == 0
        # Exactly max_batch_size is fine and runs at once.
        result = await batcher.submit(_rows(0, 4), 4)
    assert result.batch_rows == 4


@pytest.mark.parametrize("size", [0, -3])
def test_max_batch_size_must_be_positive(size: int) -> None:
    with pytest.raises(ValueError, match=f"max_batch_size={size} must be >= 1"):
        DynamicBatcher(Doubler(), max_batch_size=size, max_wait_ms=1.0)


# --- stopping --------------------------------------------------------------------------------


async def test_stop_fails_queued_items_and_is_idempotent() -> None:
    fn = Doubler()
    batcher = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=HUGE_WAIT_MS, name="q")
    await batcher.start()
    await batcher.start()  # idempotent
    futures = [batcher.submit(_rows(i, 1), 1) for i in range(3)]
    await asyncio.sleep(0)
    assert batcher.queued == 3
    await batcher.stop()
    assert fn.batch_rows == []
    assert batcher.queued == 0
    for f in futures:
        assert f.done()
        exc = f.exception()
        assert isinstance(exc, InferlineError)
        assert str(exc) == "batcher 'q' stopped before the request ran"
    await batcher.stop()  # idempotent
    with pytest.raises(InferlineError, match="not started"):
        batcher.submit(_rows(0, 1), 1)


async def test_stop_lets_a_running_batch_finish() -> None:
    fn = Doubler()
    fn.gate = asyncio.Event()
    batcher = DynamicBatcher(fn, max_batch_size=2, max_wait_ms=HUGE_WAIT_MS)
    await batcher.start()
    futures = [batcher.submit(_rows(i, 1), 1) for i in range(2)]
    await _until(lambda: fn.batch_rows == [2], "batch started")
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0)
    fn.gate.set()
    await stopping
    results = [f.result() for f in futures]
    np.testing.assert_array_equal(results[1].outputs["doubled"], _rows(1, 1)["x"] * 2)


async def test_stop_answers_a_batch_waiting_for_a_free_slot() -> None:
    # One slot: batch 1 runs (held at the gate), batch 2 is already formed and waits for
    # the slot. stop() must leave nobody without an answer: batch 2 either runs or fails.
    fn = Doubler()
    fn.gate = asyncio.Event()
    batcher = DynamicBatcher(fn, max_batch_size=2, max_wait_ms=HUGE_WAIT_MS, name="slot")
    await batcher.start()
    first = [batcher.submit(_rows(i, 1), 1) for i in range(2)]
    second = [batcher.submit(_rows(2 + i, 1), 1) for i in range(2)]
    await _until(lambda: fn.batch_rows == [2] and batcher.queued == 0, "batch 2 formed")
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0)
    fn.gate.set()
    await stopping
    assert all(f.done() for f in first)
    assert [f.done() for f in second] == [True, True], "futures of batch 2 were never resolved"
    for f in second:
        exc = f.exception()
        assert exc is None or isinstance(exc, InferlineError)


# --- helpers ---------------------------------------------------------------------------------


def test_batch_result_share() -> None:
    r = BatchResult(
        outputs={}, batch_rows=8, batch_members=3, rows=3, compute_s=0.5, batch_wait_s=0.0
    )
    assert r.share == 0.375
    whole = BatchResult(
        outputs={}, batch_rows=5, batch_members=1, rows=5, compute_s=0.0, batch_wait_s=0.0
    )
    assert whole.share == 1.0


def test_concat_and_check_outputs() -> None:
    a = {"x": np.ones((1, 2)), "m": np.zeros(1)}
    b = {"x": np.full((2, 2), 3.0), "m": np.ones(2)}
    joined = concat([a, b])
    np.testing.assert_array_equal(joined["x"], [[1, 1], [3, 3], [3, 3]])
    np.testing.assert_array_equal(joined["m"], [0, 1, 1])
    assert concat([a])["x"] is a["x"]
    check_outputs({"y": np.zeros((3, 4))}, 3)
    with pytest.raises(InferlineError, match=r"output 'y' has shape \[\], expected 3 rows"):
        check_outputs({"y": np.float32(1.0) * np.ones(())}, 3)
