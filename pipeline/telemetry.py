"""Worker telemetry: per-interval summaries of what a worker answered and computed.

The worker calls :class:`Telemetry` on its hot path; each call is a dictionary
lookup and a few additions (output summaries are computed once per ONNX batch,
vectorised). Every ``telemetry_interval_ms`` the aggregates are swapped out and
published to ``<prefix>.telemetry``:

- one :class:`RequestSummary` per (model, version, priority) that saw traffic,
  keyed by model: answer counts by status and error code, a mergeable latency
  sketch (see :mod:`pipeline.stats`), queue time, batch sizes, charged cost;
- one :class:`Heartbeat` per worker, keyed by worker id, sent even when idle:
  the pool and its hourly price, wall and busy (compute) seconds of the
  interval, and per served model version its execution provider, batches,
  rows, compute seconds and an additive summary of its outputs (a class
  histogram for classifiers, norm and unit-vector sums for embedders) in the
  form :mod:`pipeline.drift` compares with a reference.

Telemetry is best effort: a record that cannot be delivered is logged and
dropped, never retried into an ever-growing backlog, and never blocks serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from pipeline.drift import OutputSummary as DriftSummary
from pipeline.drift import summary_from_dict
from pipeline.outbox import new_producer
from pipeline.responses import STATUS_FOR_CODE
from pipeline.settings import Settings
from pipeline.stats import LatencySketch, SketchData
from pipeline.tasks import cancel_and_wait

log = logging.getLogger("inferline.telemetry")

TELEMETRY_SCHEMA_VERSION = 1
_SEND_TIMEOUT_S = 10.0
_LABEL = "label"
_PROBABILITIES = "probabilities"
_EMBEDDING = "embedding"


class ClassCounts(BaseModel):
    """Rows per predicted class (index = label) of a classifier (output ``label``).

    The wire form of :class:`pipeline.drift.ClassHistogram`.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["classes"] = "classes"
    counts: list[float]


class EmbeddingStats(BaseModel):
    """Additive statistics of an embedder's rows (output ``embedding``).

    The wire form of :class:`pipeline.drift.EmbeddingSummary`: the mean norm, its
    spread and the mean cosine to any reference direction follow from these sums.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["embedding"] = "embedding"
    count: int = Field(ge=0)
    norm_sum: float
    norm_sq_sum: float
    unit_sum: list[float] = Field(description="Sum of the L2-normalised rows.")


OutputStats = Annotated[ClassCounts | EmbeddingStats, Field(discriminator="kind")]


def to_drift_summary(stats: ClassCounts | EmbeddingStats) -> DriftSummary:
    """The :mod:`pipeline.drift` summary of an output-stats record."""
    return summary_from_dict(stats.model_dump())


class ServedVersion(BaseModel):
    """A model version on a worker, and what it computed during the interval."""

    model_config = ConfigDict(extra="forbid")

    model: str
    version: str
    execution_provider: str
    hourly_usd: float = Field(ge=0)
    batches: int = 0
    rows: int = 0
    compute_s: float = 0.0
    outputs: OutputStats | None = Field(
        default=None, description="Summary of the interval's outputs; None when no rows ran."
    )


class RequestSummary(BaseModel):
    """Answers of one (model, version, priority) on one worker over one interval."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["requests"] = "requests"
    schema_version: int = TELEMETRY_SCHEMA_VERSION
    worker: str
    pool: str
    model: str
    version: str
    priority: str
    start_ms: int = Field(description="Interval start, epoch milliseconds.")
    end_ms: int = Field(description="Interval end, epoch milliseconds.")
    count: int = Field(ge=0, description="Answers of every status.")
    statuses: dict[str, int] = Field(default_factory=dict, description="ok/error/expired/...")
    errors: dict[str, int] = Field(default_factory=dict, description="Error code -> answers.")
    rows: int = Field(default=0, ge=0, description="Rows answered ok.")
    latency_ms: SketchData = Field(
        default_factory=SketchData, description="total_ms of the ok answers."
    )
    queue_ms_sum: float = 0.0
    batch_rows_sum: int = Field(
        default=0, description="Sum over ok answers of their batch's rows."
    )
    cost_usd: float = Field(default=0.0, description="Compute cost charged to the answers.")

    @property
    def ok(self) -> int:
        """Answers with status ok."""
        return self.statuses.get("ok", 0)


class Heartbeat(BaseModel):
    """One worker's liveness and capacity use over one interval (sent even when idle)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["heartbeat"] = "heartbeat"
    schema_version: int = TELEMETRY_SCHEMA_VERSION
    worker: str
    pool: str
    started_ms: int = Field(description="When this worker's telemetry started, epoch ms.")
    start_ms: int
    end_ms: int
    wall_s: float = Field(ge=0, description="Seconds the interval lasted.")
    busy_s: float = Field(ge=0, description="ONNX Runtime seconds, all served versions.")
    hourly_usd: float = Field(ge=0, description="Price of this worker (its pool's rate).")
    served: list[ServedVersion] = Field(default_factory=list)


TelemetryRecord = Annotated[RequestSummary | Heartbeat, Field(discriminator="kind")]
_RECORD = TypeAdapter(TelemetryRecord)


def encode_record(record: RequestSummary | Heartbeat) -> bytes:
    """JSON bytes of a telemetry record."""
    return orjson.dumps(record.model_dump(), option=orjson.OPT_NON_STR_KEYS)


def decode_record(raw: bytes | str) -> RequestSummary | Heartbeat:
    """Parse a telemetry record; raises ``pydantic.ValidationError`` on a bad one."""
    return _RECORD.validate_json(raw)


class _Requests:
    __slots__ = ("batch_rows", "cost", "errors", "latencies", "queue_ms", "rows", "statuses")

    def __init__(self) -> None:
        # Not-ok answers by status; ok answers are the latencies' count. Latencies are
        # bucketed once per interval (vectorised) rather than one logarithm per answer.
        self.statuses: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.latencies = array("d")  # appends as cheaply as a list; read without a copy
        self.rows = 0
        self.queue_ms = 0.0
        self.batch_rows = 0
        self.cost = 0.0


class _Version:
    """Compute aggregates and output statistics of one served version."""

    __slots__ = ("batches", "compute_s", "emb_count", "emb_norm", "emb_norm_sq", "emb_unit",
                 "hourly_usd", "labels", "provider", "rows")

    def __init__(self, provider: str, hourly_usd: float) -> None:
        self.provider = provider
        self.hourly_usd = hourly_usd
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self.rows = 0
        self.compute_s = 0.0
        self.labels: np.ndarray[Any, Any] | None = None
        self.emb_count = 0
        self.emb_norm = 0.0
        self.emb_norm_sq = 0.0
        self.emb_unit: np.ndarray[Any, Any] | None = None

    def add_outputs(self, outputs: Mapping[str, Any]) -> None:
        label = outputs.get(_LABEL)
        if isinstance(label, np.ndarray) and label.size and label.dtype.kind in "iu":
            self._add_labels(label.ravel(), outputs.get(_PROBABILITIES))
            return
        emb = outputs.get(_EMBEDDING)
        if isinstance(emb, np.ndarray) and emb.ndim == 2 and emb.dtype.kind == "f" and emb.size:
            self._add_embeddings(emb.astype(np.float64, copy=False))

    def _add_labels(self, label: np.ndarray[Any, Any], probs: Any) -> None:
        if int(label.min()) < 0:
            return  # not class indices: nothing a histogram by index could say
        # The probabilities' width is the class count, so unseen classes show as zeros.
        width = probs.shape[1] if isinstance(probs, np.ndarray) and probs.ndim == 2 else 0
        counts = np.bincount(label, minlength=width)
        if self.labels is None:
            self.labels = counts
        elif len(counts) > len(self.labels):
            counts[: len(self.labels)] += self.labels
            self.labels = counts
        else:
            self.labels[: len(counts)] += counts

    def _add_embeddings(self, emb: np.ndarray[Any, Any]) -> None:
        norms = np.linalg.norm(emb, axis=1)
        safe = np.where(norms > 0, norms, 1.0)
        unit = (emb / safe[:, None]).sum(axis=0)
        if self.emb_unit is None or self.emb_unit.shape != unit.shape:
            self.emb_unit = unit
            self.emb_count = self.emb_norm = self.emb_norm_sq = 0  # a new dimension restarts
        else:
            self.emb_unit += unit
        self.emb_count += emb.shape[0]
        self.emb_norm += float(norms.sum())
        self.emb_norm_sq += float((norms * norms).sum())

    def output_stats(self) -> ClassCounts | EmbeddingStats | None:
        if self.labels is not None:
            return ClassCounts(counts=[float(c) for c in self.labels.tolist()])
        if self.emb_unit is not None:
            return EmbeddingStats(
                count=self.emb_count, norm_sum=self.emb_norm, norm_sq_sum=self.emb_norm_sq,
                unit_sum=self.emb_unit.tolist(),
            )
        return None


class Telemetry:
    """Aggregates a worker's answers and batches; publishes them every interval.

    Hot-path methods (:meth:`observe`, :meth:`observe_error`,
    :meth:`observe_compute`) only touch memory and never raise on a missing
    ``start()``: with ``telemetry_interval_ms = 0`` nothing is ever published.
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        *,
        worker_id: str | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self.worker_id = worker_id or settings.worker_id
        self.topic = settings.topic("telemetry")
        self._clock = clock
        self._monotonic = monotonic
        self._requests: dict[tuple[str, str, str], _Requests] = {}
        self._versions: dict[tuple[str, str], _Version] = {}
        self._started_ms = int(clock() * 1000)
        self._interval_start_ms = self._started_ms
        self._interval_start_mono = monotonic()
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    @property
    def enabled(self) -> bool:
        """Whether records are published (``telemetry_interval_ms`` > 0)."""
        return self.settings.telemetry_interval_ms > 0

    @property
    def hourly_usd(self) -> float:
        """This worker's price: ``pool_hourly_usd``, else its dearest served version's."""
        if self.settings.pool_hourly_usd is not None:
            return self.settings.pool_hourly_usd
        return max((v.hourly_usd for v in self._versions.values()), default=0.0)

    def register(self, model: str, version: str, execution_provider: str,
                 hourly_usd: float) -> None:
        """Declare a served model version (heartbeats list it even while it is idle)."""
        key = (model, version)
        known = self._versions.get(key)
        if known is None:
            self._versions[key] = _Version(execution_provider, hourly_usd)
        else:
            known.provider, known.hourly_usd = execution_provider, hourly_usd

    def observe(
        self,
        model: str,
        version: str,
        priority: str,
        total_ms: float,
        *,
        queue_ms: float = 0.0,
        rows: int = 1,
        batch_rows: int = 1,
        cost_usd: float = 0.0,
    ) -> None:
        """Count one ok answer: its end-to-end latency, queue time, batch and cost."""
        key = (model, version, priority)
        acc = self._requests.get(key)
        if acc is None:
            acc = self._requests[key] = _Requests()
        acc.latencies.append(total_ms)
        acc.rows += rows
        acc.queue_ms += queue_ms
        acc.batch_rows += batch_rows
        acc.cost += cost_usd

    def observe_error(self, model: str, version: str | None, priority: str, code: str) -> None:
        """Count one answer that is not ok, by its error code (status follows the code)."""
        key = (model or "unknown", version or "", priority)
        acc = self._requests.get(key)
        if acc is None:
            acc = self._requests[key] = _Requests()
        status = STATUS_FOR_CODE.get(code, "error")
        acc.statuses[status] = acc.statuses.get(status, 0) + 1
        acc.errors[code] = acc.errors.get(code, 0) + 1

    def observe_compute(
        self,
        model: str,
        version: str,
        batch_rows: int,
        compute_s: float,
        outputs: Mapping[str, np.ndarray[Any, Any]] | None = None,
    ) -> None:
        """Count one ONNX Runtime run and summarise its outputs (once per batch)."""
        v = self._versions.get((model, version))
        if v is None:
            v = self._versions[(model, version)] = _Version("unknown", 0.0)
        v.batches += 1
        v.rows += batch_rows
        v.compute_s += compute_s
        if outputs:
            v.add_outputs(outputs)

    def drain(self) -> list[RequestSummary | Heartbeat]:
        """Close the interval: its records (summaries, then the heartbeat), aggregates reset."""
        end_ms = int(self._clock() * 1000)
        end_mono = self._monotonic()
        start_ms, wall_s = self._interval_start_ms, max(end_mono - self._interval_start_mono, 0.0)
        self._interval_start_ms, self._interval_start_mono = end_ms, end_mono
        requests, self._requests = self._requests, {}
        pool = self.settings.pool
        out: list[RequestSummary | Heartbeat] = []
        for (model, version, priority), acc in requests.items():
            latency = LatencySketch()
            latency.add_array(np.frombuffer(acc.latencies, dtype=np.float64))
            statuses = {"ok": latency.count, **acc.statuses} if latency.count else acc.statuses
            out.append(RequestSummary(
                worker=self.worker_id, pool=pool, model=model, version=version,
                priority=priority, start_ms=start_ms, end_ms=end_ms,
                count=sum(statuses.values()), statuses=statuses, errors=acc.errors,
                rows=acc.rows, latency_ms=latency.to_data(), queue_ms_sum=acc.queue_ms,
                batch_rows_sum=acc.batch_rows, cost_usd=acc.cost,
            ))
        served: list[ServedVersion] = []
        busy_s = 0.0
        for (model, version), v in sorted(self._versions.items()):
            busy_s += v.compute_s
            served.append(ServedVersion(
                model=model, version=version, execution_provider=v.provider,
                hourly_usd=v.hourly_usd, batches=v.batches, rows=v.rows, compute_s=v.compute_s,
                outputs=v.output_stats(),
            ))
            v.reset()
        out.append(Heartbeat(
            worker=self.worker_id, pool=pool, started_ms=self._started_ms, start_ms=start_ms,
            end_ms=end_ms, wall_s=wall_s, busy_s=busy_s, hourly_usd=self.hourly_usd,
            served=served,
        ))
        return out

    async def start(self) -> None:
        """Connect and start publishing every interval (idempotent; no-op when disabled)."""
        if self._producer is not None or not self.enabled:
            return
        producer = new_producer(
            self.settings, self.bootstrap_servers,
            client_id=f"inferline-{self.worker_id}-telemetry",
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        # The first interval starts now, not when the models began loading.
        self.drain()
        self._task = asyncio.create_task(self._run(), name=f"telemetry-{self.worker_id}")

    async def stop(self) -> None:
        """Publish the last partial interval, then disconnect (idempotent)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._producer is None:
            return
        try:
            await self.publish(self.drain())
        finally:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def publish(self, records: list[RequestSummary | Heartbeat]) -> None:
        """Send records and wait for the broker; failures are logged and the records dropped."""
        producer = self._producer
        if producer is None or not records:
            return
        try:
            futures = []
            for rec in records:
                key = rec.model if isinstance(rec, RequestSummary) else rec.worker
                futures.append(await producer.send(
                    self.topic, encode_record(rec), key=key.encode(),
                    timestamp_ms=rec.end_ms,
                ))
            await asyncio.wait_for(asyncio.gather(*futures), _SEND_TIMEOUT_S)
        except Exception as exc:
            self._failures += 1
            # One line per ten failures: an unreachable broker must not flood the log.
            if self._failures % 10 == 1:
                log.warning("telemetry: dropped %d records (%d failures so far): %r",
                            len(records), self._failures, exc)

    async def _run(self) -> None:
        interval_s = self.settings.telemetry_interval_ms / 1000
        deadline = self._monotonic() + interval_s
        while True:
            await asyncio.sleep(max(deadline - self._monotonic(), 0.0))
            deadline += interval_s
            now = self._monotonic()
            if deadline < now:
                # A stalled loop starts a fresh schedule instead of publishing in a burst.
                deadline = now + interval_s
            await self.publish(self.drain())
