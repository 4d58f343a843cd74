"""Worker agents: priority lanes in, SLO-aware batches through ONNX Runtime, responses out.

The lane consumer (:mod:`pipeline.lanes`) fetches the lanes of the worker's
models and hands each record here at once. A record is validated and queued in
its model's scheduler (:mod:`pipeline.scheduler`), or answered straight away
when it is invalid, already past its deadline, or a high-priority request that
could not meet its deadline even if served next. One executor task per model
takes batches from the scheduler (highest lane first, sized by the learned
compute model) and runs them through the model version's dynamic batcher on
ONNX Runtime's thread. Each record's offset is committed only once its answer
is acknowledged by the broker (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import faust
from mode import Service

from agents.replies import reject, trace_headers
from agents.router import VERSION_HEADER
from agents.runtime import Runtime
from agents.served import Job, Served, load_models
from agents.steering import LaneSteering
from pipeline import codec
from pipeline.batcher import BatchResult
from pipeline.bulk import BulkThrottle, IntakeSizer
from pipeline.cost import message_cost_usd
from pipeline.errors import DeadlineExceeded, InferlineError, Overloaded, as_inferline_error
from pipeline.lanes import LaneConsumer
from pipeline.outbox import Outbox
from pipeline.readiness import ReadinessAnnouncer, served_readiness
from pipeline.responses import ok_response
from pipeline.rollout import COPY_TO_HEADER
from pipeline.scheduler import ModelScheduler, Pending, Take
from pipeline.telemetry import Telemetry
from pipeline.topics import PRIORITIES
from pipeline.tracing import Tracing
from pipeline.validation import decode_inputs, parse_request

log = logging.getLogger("inferline.worker")

# Records validated per poll: the intake runs on the event loop, so a large chunk of
# bulk records would hold up a high-priority record that arrives meanwhile. The batch
# lane is taken in smaller chunks still, of about BULK_INTAKE_TARGET_S of intake each
# as measured (a record that packs many rows costs more: see pipeline.batchpack), and
# at most BULK_INTAKE_MAX_RECORDS; the interactive lanes keep large ones, whose
# per-chunk overhead would cost throughput.
INTAKE_MAX_RECORDS = 256
BULK_INTAKE_MAX_RECORDS = 32
BULK_INTAKE_TARGET_S = 0.001


class Worker:
    """Loads, warms and serves the model versions of its models."""

    def __init__(self, rt: Runtime, models: Iterable[str]) -> None:
        self.rt = rt
        self.models = sorted(set(models))
        unknown = [m for m in self.models if m not in rt.registry.entries]
        if unknown:
            raise InferlineError(
                f"worker asked to serve {unknown}, not in registry {rt.registry.source}"
            )
        self.served: dict[tuple[str, str], Served] = {}
        self.schedulers: dict[str, ModelScheduler] = {}
        self._started = False
        self.producer = rt.producer()
        self.telemetry = Telemetry(rt.settings, rt.bootstrap_servers, worker_id=rt.worker_id)
        self.tracing = Tracing.from_settings(rt.settings, "worker")
        s = rt.settings
        self.steering = LaneSteering(rt, self.models, self.schedulers)
        self.bulk_chunks = IntakeSizer(target_s=BULK_INTAKE_TARGET_S,
                                       most=min(s.take_max, BULK_INTAKE_MAX_RECORDS))
        self._bulk_rank = PRIORITIES.index("batch")
        self._lane_of = self.steering.lane_of
        self.consumer = LaneConsumer(
            s,
            rt.bootstrap_servers,
            topics=list(self._lane_of),
            group_id=s.worker_group_id(),
            on_records=self._on_records,
            on_revoked=self._on_revoked,
            name="worker",
            max_records=min(s.take_max, INTAKE_MAX_RECORDS),
            topic_rank={t: PRIORITIES.index(lane[1]) for t, lane in self._lane_of.items()},
            max_records_by_rank={self._bulk_rank: self.bulk_chunks.records},
            fetch_wait_ms=(self.steering.fetch_wait_ms
                           if s.busy_fetch_max_wait_ms or s.idle_wait_is_longer else None),
        )
        if s.idle_wait_is_longer:
            self.steering.idle_wait_ms = self.consumer.idle_aware_wait_ms
        self._executors: list[asyncio.Task[None]] = []
        self._deliveries: set[asyncio.Task[None]] = set()
        self.bulk = BulkThrottle(share=s.batch_share_when_busy,
                                 interval_ms=s.batch_interval_when_busy_ms)
        # Readiness on the control topic: after warm-up, as a heartbeat, and at stop.
        self.readiness = ReadinessAnnouncer(
            s, rt.bootstrap_servers, worker_id=rt.worker_id, pool=s.pool,
            versions=lambda: served_readiness(self.served.values()),
        )

    def load(self) -> None:
        """Load and warm every version of the worker's models (blocking; before serving)."""
        served, schedulers = load_models(self.rt, self.models, self.telemetry,
                                         bulk_throttled=self.bulk.enabled)
        self.served.update(served)
        # Filled in place: the steering holds this same map.
        self.schedulers.update(schedulers)

    async def start(self) -> None:
        """Start the producer, batchers and executors, then join the worker group (idempotent)."""
        if self._started:
            return
        if not self.served:
            self.load()
        await self.producer.start()
        await self.telemetry.start()
        if self.tracing is not None:
            await self.tracing.start()
        for served in self.served.values():
            await served.batcher.start()
        self._started = True
        # One executor per model and instance: with instances > 1, several batches of
        # the model compute at once (each takes its own batch from the scheduler).
        executors_of = {
            m: max(sv.session.instances for (name, _), sv in self.served.items() if name == m)
            for m in self.models
        }
        self._executors = [
            asyncio.create_task(self._execute(m), name=f"execute:{m}:{i}")
            for m, n in executors_of.items() for i in range(n)
        ]
        for m, n in executors_of.items():
            self.schedulers[m].executors = n
        await self.readiness.start()
        await self.consumer.start()
        self.rt.metrics.worker_ready.set(1)

    async def stop(self) -> None:
        """Answer and commit what was taken, then stop executors and sessions (idempotent)."""
        if not self._started:
            return
        self._started = False
        self.rt.metrics.worker_ready.set(0)
        await self.readiness.stop()
        # The consumer stops fetching and waits (up to the grace period) for the
        # executors to answer everything already taken, then commits and leaves.
        await self.consumer.stop()
        for task in self._executors:
            task.cancel()
        for task in self._executors:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._executors = []
        if self._deliveries:
            await asyncio.gather(*self._deliveries, return_exceptions=True)
        await self.telemetry.stop()
        if self.tracing is not None:
            await self.tracing.stop()
        for served in self.served.values():
            await served.batcher.stop()
            served.session.close()
        await self.producer.stop()

    # -- intake: called by the lane consumer with each polled chunk ------------------

    def _on_records(self, records: Sequence[Any]) -> None:
        # Chunks come lane by lane: a batch-lane chunk's intake is bulk work, counted
        # against the bulk share (see _step) and sizing the next chunk; the others are
        # not timed.
        lane = self._lane_of.get(records[0].topic) if records else None
        if lane is None or lane[1] != "batch":
            self._intake(records)
            return
        cpu_s, loop_s = time.process_time(), time.thread_time()
        self._intake(records)
        # thread_time: the event loop's own time, not the executors' computing beside it.
        self.consumer.cap_chunks(self._bulk_rank, self.bulk_chunks.took(
            len(records), time.thread_time() - loop_s))
        if self.bulk.enabled:
            self.bulk.intake(lane[0], time.process_time() - cpu_s)

    def _intake(self, records: Sequence[Any]) -> None:
        rt = self.rt
        s = rt.settings
        received_ms = time.time() * 1000
        outbox: Outbox | None = None
        answered: list[Any] = []
        for msg in records:
            raw: bytes = msg.value or b""
            req = None
            version: str | None = None
            try:
                req = parse_request(raw, max_request_bytes=s.max_request_bytes)
                version = _header(msg.headers, VERSION_HEADER) or req.version
                spec = rt.registry.resolve(req.model, version)
                # Records written straight to a lane (batch jobs) name no version:
                # answers and telemetry carry the one that serves them.
                version = spec.version
                served = self.served.get((spec.name, spec.version))
                if served is None:
                    raise InferlineError(f"this worker does not serve {spec.key}")
                ts_s = float(msg.timestamp) / 1000
                deadline = ts_s + req.timeout_ms / 1000 if req.timeout_ms is not None else None
                # Under overload a lower lane's backlog comes in already expired: answer
                # it before paying for decoding inputs that will never be computed.
                if deadline is not None and received_ms >= deadline * 1000:
                    assert req.timeout_ms is not None
                    raise DeadlineExceeded(req.id, req.timeout_ms, received_ms - ts_s * 1000)
                inputs, rows = decode_inputs(req, spec)
                sched = self.schedulers[spec.name]
                # The lane, not the record's own field, says how urgent it is: bulk
                # producers write straight to a batch lane.
                lane = self._lane_of.get(msg.topic)
                priority = lane[1] if lane is not None else req.priority
                item = Pending(
                    id=req.id, version=spec.version, priority=priority, rows=rows,
                    ts_s=ts_s, deadline_s=deadline,
                    budget_s=sched.budget_for(spec.version, priority, ts_s, deadline),
                    partition=(msg.topic, msg.partition),
                    payload=Job(msg, req, served, inputs, received_ms),
                )
                verdict = sched.admit(item)
                if verdict == "queued":
                    continue
                if verdict == "expired":
                    assert req.timeout_ms is not None
                    raise DeadlineExceeded(req.id, req.timeout_ms, received_ms - ts_s * 1000)
                why = (f"its timeout_ms={req.timeout_ms} cannot be met even if served next"
                       if req.timeout_ms is not None else "no room for more")
                raise Overloaded(
                    f"request {req.id!r} (high priority) rejected: {sched.inflight_rows} rows "
                    f"of {spec.name} ahead or running (max_inflight={sched.max_inflight}); "
                    f"{why}",
                    request_id=req.id, timeout_ms=req.timeout_ms,
                )
            except Exception as exc:
                error = as_inferline_error(exc, "reading the record")
                if error is not exc:
                    log.exception("record %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset,
                                  error)
                if outbox is None:
                    outbox = self.producer.outbox()
                self._refuse(outbox, msg, req, version, error)
                answered.append(msg)
        if outbox is not None:
            self._deliver(outbox, answered)
        self._steer()

    def _refuse(self, outbox: Outbox, msg: Any, req: Any, version: str | None,
                error: InferlineError) -> None:
        """Answer a record that will not be computed (error, expired or rejected)."""
        s = self.rt.settings
        routine = isinstance(error, DeadlineExceeded | Overloaded)
        reject(
            self.rt, outbox, raw=msg.value or b"", key=msg.key, headers=msg.headers,
            source_topic=msg.topic, error=error,
            request_id=req.id if req else None,
            reply_to=(req.reply_to or s.topic("responses")) if req else None,
            model=req.model if req else "",
            version=version if req else None,
            priority=req.priority if req else "normal",
            dead_letter=not routine,
        )
        self.telemetry.observe_error(req.model if req else "", version,
                                     req.priority if req else "normal", error.code)

    def _on_revoked(self, partitions: set[tuple[str, int]]) -> list[tuple[str, int, int]]:
        dropped: list[tuple[str, int, int]] = []
        for sched in self.schedulers.values():
            for p in sched.drop(partitions):
                dropped.append((p.partition[0], p.partition[1], p.payload.msg.offset))
        if dropped:
            log.info("rebalance: %d queued records left to the partitions' next owner",
                     len(dropped))
        return dropped

    def _steer(self) -> None:
        self.steering.steer(self.consumer)

    # -- execution: one task per model -------------------------------------------------

    async def _execute(self, model: str) -> None:
        sched = self.schedulers[model]
        while True:
            try:
                waited = await self._step(sched)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug here must not silently stop a model being served: say so, go on.
                log.exception("executor of %s failed a step; continuing", model)
                waited = False
            if not waited:
                await asyncio.sleep(0)

    async def _step(self, sched: ModelScheduler) -> bool:
        """Run one batch, or answer expired requests, or wait; True if it waited."""
        pause_s = self.bulk.pause_left_s(sched.model)
        if pause_s > 0 and sched.only_bulk_queued():
            # Bulk work fills idle capacity only (see pipeline/bulk.py), which also
            # slows the bulk producer's feed and leaves the router and broker room. An
            # interactive request arriving meanwhile is served at once; the pause then
            # goes on before the next bulk batch.
            sched.interactive.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sched.interactive.wait(), pause_s)
            return True
        sched.changed.clear()
        take = sched.next_batch()
        if take.expired:
            self._expire(take.expired)
        if take.items:
            bulk = self.bulk.enabled and all(p.priority == "batch" for p in take.items)
            cpu_s = time.process_time() if bulk else 0.0
            await self._run(sched, take)
            if bulk:
                self.bulk.ran(sched.model, time.process_time() - cpu_s,
                              interactive_active=sched.interactive_active())
            return False
        if take.expired:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sched.changed.wait(), take.wait_s)
        return True

    def _expire(self, items: list[Pending]) -> None:
        outbox = self.producer.outbox()
        now_ms = time.time() * 1000
        for p in items:
            job: Job = p.payload
            assert job.req.timeout_ms is not None
            error = DeadlineExceeded(job.req.id, job.req.timeout_ms, now_ms - p.ts_s * 1000)
            self._refuse(outbox, job.msg, job.req, p.version, error)
        self._deliver(outbox, [p.payload.msg for p in items])
        self._steer()

    async def _run(self, sched: ModelScheduler, take: Take) -> None:
        served = self.served[(sched.model, take.version)]
        rows = sum(p.rows for p in take.items)
        sched.started(take.version, rows)
        started_ms = time.time() * 1000
        futures = [served.batcher.submit(p.payload.inputs, p.rows) for p in take.items]
        served.batcher.flush()
        results = await asyncio.gather(*futures, return_exceptions=True)
        learned = next((r for r in results if isinstance(r, BatchResult)), None)
        if learned is not None:
            sched.finished(take.version, learned.batch_rows, learned.compute_s, started_rows=rows)
        else:
            sched.finished(take.version, 0, 0.0, started_rows=rows)
        outbox = self.producer.outbox()
        s = self.rt.settings
        for p, result in zip(take.items, results, strict=True):
            job: Job = p.payload
            if isinstance(result, BatchResult):
                self._answer(outbox, job, result, started_ms)
                continue
            error = as_inferline_error(result, "running the batch")
            reject(
                self.rt, outbox, raw=job.msg.value, key=job.msg.key, headers=job.msg.headers,
                source_topic=job.msg.topic, error=error, request_id=job.req.id,
                reply_to=job.req.reply_to or s.topic("responses"), model=job.req.model,
                version=take.version, priority=job.req.priority,
            )
            self.telemetry.observe_error(job.req.model, take.version, job.req.priority,
                                         error.code)
        self._deliver(outbox, [p.payload.msg for p in take.items])
        self._steer()

    def _deliver(self, outbox: Outbox, msgs: list[Any]) -> None:
        """Send ``outbox`` in the background; mark ``msgs`` answered once acknowledged."""
        task = asyncio.create_task(self._send(outbox, msgs))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _send(self, outbox: Outbox, msgs: list[Any]) -> None:
        attempt = 0
        while True:
            try:
                await outbox.flush()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The records stay uncommitted until this succeeds: a broker outage
                # delays answers, never drops them.
                attempt += 1
                backoff_s = min(0.1 * 2**attempt, 5.0)
                if attempt == 1 or attempt % 16 == 0:
                    log.warning("sending %d answers failed (attempt %d): %r; retrying in %.1fs",
                                len(outbox), attempt, exc, backoff_s)
                await asyncio.sleep(backoff_s)
        done = self.consumer.done
        for msg in msgs:
            done(msg.topic, msg.partition, msg.offset)

    def _answer(self, outbox: Outbox, job: Job, result: BatchResult, started_ms: float) -> None:
        spec = job.served.spec
        req = job.req
        ts_ms = float(job.msg.timestamp)
        cost = message_cost_usd(spec.hourly_usd, result.compute_s, result.rows, result.batch_rows)
        now_ms = time.time() * 1000
        total_ms = now_ms - ts_ms
        # Queue: until this worker took the record; batch wait: until its batch started.
        queue_ms = max(job.received_ms - ts_ms, 0.0)
        batch_wait_ms = max(started_ms - job.received_ms, 0.0)
        binary = req.binary_data_output
        value = ok_response(
            request_id=req.id,
            model=spec.name,
            version=spec.version,
            outputs=[codec.encode(k, v, binary=binary) for k, v in result.outputs.items()],
            queue_ms=queue_ms,
            batch_wait_ms=batch_wait_ms,
            compute_ms=result.compute_s * 1000,
            total_ms=total_ms,
            batch_size=result.batch_rows,
            cost_usd=cost,
            worker=self.rt.worker_id,
            execution_provider=job.served.session.execution_provider,
        )
        m = self.rt.metrics
        m.request_child(spec.name, spec.version, req.priority, "ok").inc()
        m.latency_child(spec.name, spec.version, req.priority).observe(total_ms / 1000)
        m.queue_child(spec.name, spec.version, req.priority).observe(queue_ms / 1000)
        m.cost_child(spec.name, spec.version).inc(cost)
        self.telemetry.observe(spec.name, spec.version, req.priority, total_ms,
                               queue_ms=queue_ms, rows=result.rows,
                               batch_rows=result.batch_rows, cost_usd=cost)
        if self.tracing is not None:
            self.tracing.worker_spans(
                job.msg.headers, ts_ms=ts_ms, received_ms=job.received_ms,
                compute_start_ms=started_ms, compute_ms=result.compute_s * 1000, end_ms=now_ms,
                request_id=req.id, model=spec.name, version=spec.version,
                priority=req.priority, batch_rows=result.batch_rows,
            )
        outbox.add(
            req.reply_to or self.rt.settings.topic("responses"),
            req.id.encode(),
            value,
            headers=trace_headers(job.msg.headers) or (),
        )
        copy_to = _header(job.msg.headers, COPY_TO_HEADER)
        if copy_to:  # the router asks for a copy of this answer (canary comparison)
            outbox.add(copy_to, req.id.encode(), value)


def _header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    for k, v in headers or ():
        if k == name:
            return v.decode("utf-8", "replace")
    return None


def install(app: faust.App, rt: Runtime, models: Iterable[str]) -> Worker:
    """Run a worker for ``models`` as a service of ``app``; loads and warms them now."""
    worker = Worker(rt, models)
    worker.load()

    @app.service
    class WorkerService(Service):
        async def on_start(self) -> None:
            await worker.start()

        async def on_stop(self) -> None:
            await worker.stop()

    return worker
