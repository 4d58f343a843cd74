"""Dynamic batching: many requests in, one ONNX Runtime call, results split back.

Each submitted item gets its own future. A batch is flushed when it holds
``max_batch_size`` rows, when its oldest member has waited ``max_wait_ms``, or
when the feeder calls :meth:`DynamicBatcher.flush` to say nothing more is
coming right now (waiting longer would then only add latency). Members are
concatenated along the batch dimension and the outputs are split back by each
member's row count.

When a batch of several members fails (the run raises, or its outputs do not
have one row per input row), it is bisected: each half runs on its own, and a
half that fails again is split again, down to single members. Members in halves
that succeed get their results; only a member whose own run fails gets the
error. One bad request thus costs its batch about ``2 * log2(members)`` extra
runs instead of failing everyone with it. Deliberate inferline errors other than
:class:`InferenceFailed` (a closed session, an overloaded device) say nothing
about the inputs and fail every member at once. Either way each member's future
gets exactly one result or exception: nobody is left without an answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import InferenceFailed, InferlineError
from pipeline.tasks import Lifecycle, cancel_and_wait

log = logging.getLogger("inferline.batcher")

Arrays = dict[str, np.ndarray[Any, Any]]
RunBatch = Callable[[Arrays], Awaitable[tuple[Arrays, float]]]


@dataclass(slots=True)
class BatchItem:
    """One request's inputs waiting for a batch."""

    inputs: Mapping[str, np.ndarray[Any, Any]]
    rows: int
    future: asyncio.Future[BatchResult]
    enqueued_at: float = field(default_factory=time.perf_counter)
    # Set by flush() on the last item queued: a batch never runs past it.
    ends_batch: bool = False


@dataclass(slots=True, frozen=True)
class BatchResult:
    """What one member gets back from the batch it ran in.

    After a bisection that batch is the sub-batch whose run succeeded: its rows,
    members and compute seconds, so that cost is charged per actual run.
    """

    outputs: Arrays
    batch_rows: int
    batch_members: int
    rows: int
    compute_s: float
    batch_wait_s: float

    @property
    def share(self) -> float:
        """This member's fraction of the batch, by rows."""
        return self.rows / self.batch_rows


class DynamicBatcher(Lifecycle):
    """Forms batches for one model version and runs them through ``run_batch``.

    ``run_batch`` receives the concatenated inputs and returns the outputs and
    the compute seconds; it must not block the event loop (the session runs
    ONNX Runtime in its own thread).
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        name: str = "model",
        max_concurrent_batches: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._run_batch = run_batch
        self._queue: deque[BatchItem] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._flush_requested = False
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.batches_run = 0
        self.rows_run = 0
        self.bisections = 0
        self.failed_members = 0

    async def start(self) -> None:
        """Start the batch-forming loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"batcher:{self.name}")

    async def stop(self) -> None:
        """Stop forming batches; queued items fail, running batches finish (idempotent)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(
                    InferlineError(f"batcher {self.name!r} stopped before the request ran")
                )
        self._queued_rows = 0

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    def submit(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], rows: int
    ) -> asyncio.Future[BatchResult]:
        """Queue one request of ``rows`` rows; its future resolves with its slice."""
        if self._task is None:
            raise InferlineError(f"batcher {self.name!r} is not started")
        if rows > self.max_batch_size:
            raise ValueError(f"rows={rows} exceeds max_batch_size={self.max_batch_size}")
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._queue.append(BatchItem(inputs, rows, future))
        self._queued_rows += rows
        self._wakeup.set()
        return future

    def flush(self) -> None:
        """Tell the batcher no more items are coming now: run what is queued.

        What is queued by then runs without what is submitted after: a feeder that
        forms its own batches (the worker's scheduler) flushes after each, and two
        of them submitted before the batcher's loop runs stay two runs, as formed,
        instead of one merged run.
        """
        if self._queue:
            self._queue[-1].ends_batch = True
        self._flush_requested = True
        self._wakeup.set()

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._flush_requested = False
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._queued_rows < self.max_batch_size and not self._flush_requested:
                remaining = self._queue[0].enqueued_at + self.max_wait_s - time.perf_counter()
                if remaining > 0:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        pass
                    continue
            batch = self._take()
            if not self._queue:
                self._flush_requested = False
            try:
                await self._slots.acquire()
            except asyncio.CancelledError:
                # stop() cancelled us while the formed batch waited for a slot: put it
                # back at the front of the queue, in order, so that stop() answers it.
                self._queue.extendleft(reversed(batch))
                self._queued_rows += sum(item.rows for item in batch)
                raise
            task = asyncio.create_task(self._run(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _take(self) -> list[BatchItem]:
        batch: list[BatchItem] = []
        rows = 0
        while self._queue and rows + self._queue[0].rows <= self.max_batch_size:
            item = self._queue.popleft()
            rows += item.rows
            batch.append(item)
            if item.ends_batch:
                break
        self._queued_rows -= rows
        return batch

    async def _run(self, batch: list[BatchItem]) -> None:
        try:
            await self._attempt(batch)
        finally:
            self._slots.release()

    async def _attempt(self, members: list[BatchItem]) -> None:
        """Run ``members`` as one batch; on failure bisect it (one ORT call per half)."""
        live = [item for item in members if not item.future.done()]
        if not live:
            return
        rows = sum(item.rows for item in live)
        started = time.perf_counter()
        try:
            outputs, compute_s = await self._run_batch(concat([item.inputs for item in live]))
            try:
                check_outputs(outputs, rows)
            except InferlineError as exc:
                raise InferenceFailed(self.name, "", rows, exc) from exc
        except Exception as exc:
            if len(live) > 1 and _input_dependent(exc):
                self.bisections += 1
                log.info(
                    "batch of %d members (%d rows) on %s failed, bisecting: %s",
                    len(live), rows, self.name, exc,
                )
                half = len(live) // 2
                await self._attempt(live[:half])
                await self._attempt(live[half:])
                return
            error = exc if isinstance(exc, InferlineError) else InferenceFailed(
                self.name, "", rows, exc
            )
            log.warning(
                "batch of %d members (%d rows) on %s failed: %s", len(live), rows, self.name, error
            )
            for item in live:
                if not item.future.done():
                    self.failed_members += 1
                    item.future.set_exception(error)
            return
        self.batches_run += 1
        self.rows_run += rows
        offset = 0
        for item in live:
            end = offset + item.rows
            if not item.future.done():
                item.future.set_result(
                    BatchResult(
                        outputs={k: v[offset:end] for k, v in outputs.items()},
                        batch_rows=rows,
                        batch_members=len(live),
                        rows=item.rows,
                        compute_s=compute_s,
                        batch_wait_s=started - item.enqueued_at,
                    )
                )
            offset = end


def _input_dependent(exc: Exception) -> bool:
    """Whether a failure may come from some member's inputs, so bisecting can help.

    Anything raised by the run (or by joining the members' inputs) may, and so does
    :class:`InferenceFailed`, which is how a session reports ONNX Runtime errors;
    other inferline errors are about the model or the system, not one request.
    """
    return isinstance(exc, InferenceFailed) or not isinstance(exc, InferlineError)


def concat(members: list[Mapping[str, np.ndarray[Any, Any]]]) -> Arrays:
    """Concatenate members' inputs along the batch dimension, name by name."""
    if len(members) == 1:
        return dict(members[0])
    return {name: np.concatenate([m[name] for m in members]) for name in members[0]}


def check_outputs(outputs: Mapping[str, np.ndarray[Any, Any]], rows: int) -> None:
    """Every output must have one row per input row, or splitting would misalign."""
    for name, value in outputs.items():
        if value.shape[:1] != (rows,):
            raise InferlineError(
                f"output {name!r} has shape {list(value.shape)}, expected {rows} rows "
                "(one per input row)"
            )
