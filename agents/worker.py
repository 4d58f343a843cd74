"""Worker agents: lane records in, dynamic batches through ONNX Runtime, responses out.

Each polled batch of lane records is decoded, fed to the dynamic batcher of its
model version, answered, and only when every answer is acknowledged by the
broker does the batch consumer commit its offsets (at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import faust
from mode import Service

from agents.replies import reject, trace_headers
from agents.router import VERSION_HEADER
from agents.runtime import Runtime
from pipeline import codec
from pipeline.batcher import BatchResult, DynamicBatcher
from pipeline.consumer import BatchConsumer
from pipeline.cost import message_cost_usd
from pipeline.errors import DeadlineExceeded, InferlineError, as_inferline_error
from pipeline.outbox import Outbox
from pipeline.registry import ModelVersion
from pipeline.responses import ok_response
from pipeline.session import ModelSession
from pipeline.telemetry import Telemetry
from pipeline.topics import PRIORITIES
from pipeline.validation import decode_inputs, parse_request

log = logging.getLogger("inferline.worker")



@dataclass
class Served:
    """One model version this worker serves: its session and its batcher."""

    spec: ModelVersion
    session: ModelSession
    batcher: DynamicBatcher


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
        self._started = False
        self.producer = rt.producer()
        self.telemetry = Telemetry(rt.settings, rt.bootstrap_servers, worker_id=rt.worker_id)
        self.consumer = BatchConsumer(
            rt.settings,
            rt.bootstrap_servers,
            topics=self.lane_topics(),
            group_id=rt.settings.group_id("worker"),
            handler=self.handle,
            name="worker",
        )

    def load(self) -> None:
        """Load and warm every version of the worker's models (blocking; before serving)."""
        s = self.rt.settings
        for name in self.models:
            for spec in self.rt.registry.entries[name].versions:
                provider = s.execution_provider if s.execution_provider != "auto" else (
                    spec.execution_provider
                )
                session = ModelSession(spec, provider=provider, intra_op_threads=s.intra_op_threads)
                session.load()
                session.warmup()
                self.rt.metrics.model_ready.labels(
                    spec.name, spec.version, session.execution_provider
                ).set(1)
                batcher = DynamicBatcher(
                    self._runner(spec, session),
                    max_batch_size=spec.max_batch_size,
                    max_wait_ms=spec.max_wait_ms,
                    name=spec.key,
                )
                self.served[(spec.name, spec.version)] = Served(spec, session, batcher)

    async def start(self) -> None:
        """Start the producer and batchers, then join the worker group (idempotent)."""
        if self._started:
            return
        if not self.served:
            self.load()
        await self.producer.start()
        await self.telemetry.start()
        for served in self.served.values():
            await served.batcher.start()
        self._started = True
        await self.consumer.start()
        self.rt.metrics.worker_ready.set(1)

    async def stop(self) -> None:
        """Finish and commit the batch in hand, then stop batchers and sessions (idempotent)."""
        if not self._started:
            return
        self._started = False
        self.rt.metrics.worker_ready.set(0)
        await self.consumer.stop()
        await self.telemetry.stop()
        for served in self.served.values():
            await served.batcher.stop()
            served.session.close()
        await self.producer.stop()

    def lane_topics(self) -> list[str]:
        """The lane topics of every served model and priority."""
        return [self.rt.settings.lane_topic(m, p) for m in self.models for p in PRIORITIES]

    def _runner(self, spec: ModelVersion, session: ModelSession) -> Any:
        metrics = self.rt.metrics
        batch_hist = metrics.batch_size.labels(spec.name, spec.version)
        compute_hist = metrics.compute.labels(spec.name, spec.version)
        telemetry = self.telemetry
        telemetry.register(spec.name, spec.version, session.execution_provider, spec.hourly_usd)

        async def run(inputs: dict[str, Any]) -> tuple[dict[str, Any], float]:
            outputs, compute_s = await session.run_async(inputs)
            rows = next(iter(inputs.values())).shape[0]
            batch_hist.observe(rows)
            compute_hist.observe(compute_s)
            telemetry.observe_compute(spec.name, spec.version, rows, compute_s, outputs)
            return outputs, compute_s

        return run

    async def handle(self, records: Sequence[Any]) -> None:
        """Serve one batch of lane records; returns once every answer is acknowledged."""
        rt = self.rt
        s = rt.settings
        received_ms = time.time() * 1000
        outbox = self.producer.outbox()
        work: list[tuple[Any, Any, Served, asyncio.Future[BatchResult], float]] = []
        touched: set[int] = set()
        for msg in records:
            raw: bytes = msg.value or b""
            req = None
            version: str | None = None
            try:
                req = parse_request(raw, max_request_bytes=s.max_request_bytes)
                version = _header(msg.headers, VERSION_HEADER) or req.version
                spec = rt.registry.resolve(req.model, version)
                served = self.served.get((spec.name, spec.version))
                if served is None:
                    raise InferlineError(f"this worker does not serve {spec.key}")
                ts_ms = float(msg.timestamp)
                if req.timeout_ms is not None and received_ms - ts_ms > req.timeout_ms:
                    raise DeadlineExceeded(req.id, req.timeout_ms, received_ms - ts_ms)
                inputs, rows = decode_inputs(req, spec)
            except Exception as exc:
                error = as_inferline_error(exc, "reading the record")
                if error is not exc:
                    log.exception("record %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset,
                                  error)
                reject(
                    rt, outbox, raw=raw, key=msg.key, headers=msg.headers,
                    source_topic=msg.topic, error=error,
                    request_id=req.id if req else None,
                    reply_to=(req.reply_to or s.topic("responses")) if req else None,
                    model=req.model if req else "",
                    version=version if req else None,
                    priority=req.priority if req else "normal",
                    dead_letter=not isinstance(error, DeadlineExceeded),
                )
                self.telemetry.observe_error(req.model if req else "", version,
                                             req.priority if req else "normal", error.code)
                continue
            future = served.batcher.submit(inputs, rows)
            touched.add(id(served))
            work.append((msg, req, served, future, ts_ms))
        # The chunk is all there is right now: waiting longer would only add latency.
        for served in self.served.values():
            if id(served) in touched:
                served.batcher.flush()
        for msg, req, served, future, ts_ms in work:
            try:
                result = await future
            except InferlineError as error:
                reject(
                    rt, outbox, raw=msg.value, key=msg.key, headers=msg.headers,
                    source_topic=msg.topic, error=error, request_id=req.id,
                    reply_to=req.reply_to or s.topic("responses"), model=req.model,
                    version=served.spec.version, priority=req.priority,
                )
                self.telemetry.observe_error(req.model, served.spec.version, req.priority,
                                             error.code)
                continue
            self._answer(outbox, msg, req, served, result, ts_ms, received_ms)
        await outbox.flush()

    def _answer(
        self, outbox: Outbox, msg: Any, req: Any, served: Served, result: BatchResult,
        ts_ms: float, received_ms: float,
    ) -> None:
        spec = served.spec
        cost = message_cost_usd(spec.hourly_usd, result.compute_s, result.rows, result.batch_rows)
        now_ms = time.time() * 1000
        total_ms = now_ms - ts_ms
        value = ok_response(
            request_id=req.id,
            model=spec.name,
            version=spec.version,
            outputs=[codec.encode(k, v) for k, v in result.outputs.items()],
            queue_ms=max(received_ms - ts_ms, 0.0),
            batch_wait_ms=result.batch_wait_s * 1000,
            compute_ms=result.compute_s * 1000,
            total_ms=total_ms,
            batch_size=result.batch_rows,
            cost_usd=cost,
            worker=self.rt.worker_id,
            execution_provider=served.session.execution_provider,
        )
        m = self.rt.metrics
        m.request_child(spec.name, spec.version, req.priority, "ok").inc()
        m.latency_child(spec.name, spec.version, req.priority).observe(total_ms / 1000)
        m.queue_child(spec.name, spec.version, req.priority).observe(
            max(received_ms - ts_ms, 0.0) / 1000
        )
        m.cost_child(spec.name, spec.version).inc(cost)
        self.telemetry.observe(spec.name, spec.version, req.priority, total_ms,
                               queue_ms=max(received_ms - ts_ms, 0.0), rows=result.rows,
                               batch_rows=result.batch_rows, cost_usd=cost)
        outbox.add(
            req.reply_to or self.rt.settings.topic("responses"),
            req.id.encode(),
            value,
            headers=trace_headers(msg.headers) or (),
        )


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
