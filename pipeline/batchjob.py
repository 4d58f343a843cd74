"""Batch jobs: every row of a file through the ``batch`` priority lane, results in order.

A :class:`BatchJob` reads the input rows (:mod:`pipeline.batchio`), skips the ids its
output already holds (a rerun resumes), sends the others through an
:class:`~pipeline.client.InferenceClient` with a bounded number in flight, and
writes each result as the completed prefix grows, so the output is always in input
order. Each request carries the job id in ``parameters.job_id`` and in the
``inferline-job-id`` header, and goes to the ``batch`` lane, which the workers serve
with the capacity interactive traffic leaves.

The job's progress (total, done, failed, cost, throughput) is saved as JSON in
``<state_dir>/jobs/<job id>.json`` and published on the compacted control topic
under the key ``job:<job id>``, about once a second and when the job ends;
:func:`load_status` reads it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline import codec
from pipeline.batchio import (
    BatchRow,
    InOrder,
    JournalWriter,
    check_job_id,
    count_rows,
    file_format,
    finalize,
    journal_path,
    latest_by_id,
    output_value,
    read_records,
    read_rows,
    row_tensors,
)
from pipeline.batchpack import Pack, packs, split_outputs
from pipeline.client import InferenceClient
from pipeline.control import JOB_KEY_PREFIX
from pipeline.errors import BrokerError, InferlineError, InvalidRequest
from pipeline.registry import TensorSpec
from pipeline.settings import Settings
from pipeline.tasks import cancel_and_wait
from schemas.messages import BINARY_DATA_OUTPUT, InferenceResponse, Tensor

JOB_HEADER = "inferline-job-id"
STATUS_EVERY_S = 1.0
# A job waits for answers in bulk: polling for them every 10 ms, as interactive
# clients do, would cost the broker (and so the interactive traffic beside the job)
# a fetch every 10 ms for nothing; with max_in_flight rows out, 100 ms between
# fetches still allows thousands of rows a second.
BATCH_FETCH_WAIT_MS = 100
JobState = Literal["running", "completed", "failed", "interrupted"]


@dataclass(frozen=True)
class BatchJobConfig:
    """What a batch job runs, where it writes, and how hard it pushes."""

    job_id: str
    model: str
    input: Path
    output: Path
    version: str | None = None
    # Rows awaiting an answer at once.
    max_in_flight: int = 512
    # Consecutive rows of the same inputs sent as one request (pipeline.batchpack);
    # at most the model's max_batch_size, which the worker enforces.
    rows_per_request: int = 16
    # Results held back for an earlier row, at most this many times max_in_flight.
    reorder_window: int = 8
    wait_timeout_s: float = 600.0
    retry_failed: bool = False
    # Ask for numeric outputs as base64 buffers (binary_data_output): the rows' values
    # written to the output are the same, at about half the bytes through the broker
    # for float outputs and no number formatting or parsing on the way.
    binary_outputs: bool = True


@dataclass
class JobStatus:
    """A job's progress, as saved in its state file and on the control topic."""

    job_id: str
    model: str
    version: str | None
    input: str
    output: str
    state: JobState = "running"
    total: int = 0
    done: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    sent: int = 0
    cost_usd: float = 0.0
    throughput_rps: float = 0.0
    elapsed_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    updated_at: float = 0.0

    def to_json(self) -> bytes:
        """This status as JSON bytes."""
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> JobStatus:
        """A status from :meth:`to_json`'s output; unknown keys are ignored."""
        raw = orjson.loads(data)
        if not isinstance(raw, dict) or "job_id" not in raw:
            raise InvalidRequest("not a batch job status record")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def outcome_key(record: Mapping[str, Any]) -> str:
    """``ok``, or the status and error code of a failed row (``error:INVALID_INPUT``)."""
    status = str(record.get("status"))
    error = record.get("error")
    if status == "ok" or not isinstance(error, Mapping):
        return status
    return f"{status}:{error.get('code')}"


def result_record(
    row: BatchRow, job_id: str, resp: InferenceResponse, latency_ms: float, *,
    outputs: list[dict[str, Any]] | None = None, cost_usd: float | None = None,
) -> dict[str, Any]:
    """The output record of a row the pipeline answered.

    A row sent in a pack takes ``outputs`` (its slice of the answer, see
    :func:`pipeline.batchpack.split_outputs`) and ``cost_usd`` (its share).
    """
    values = None
    if resp.status == "ok":
        tensors = outputs if outputs is not None else [_fields(t) for t in resp.outputs]
        values = {str(t["name"]): output_value(t) for t in tensors}
    return {
        "index": row.index, "id": row.id, "job_id": job_id, "status": resp.status,
        "outputs": values,
        "error": resp.error.model_dump() if resp.error is not None else None,
        "model": resp.model, "version": resp.version,
        "cost_usd": resp.cost_usd if cost_usd is None else cost_usd,
        "latency_ms": round(latency_ms, 3),
    }


def _fields(tensor: Tensor) -> dict[str, Any]:
    # model_dump would copy the data, thousands of values for an embedding of a pack.
    fields: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                              "shape": tensor.shape, "data": tensor.data}
    if codec.is_buffer(tensor.datatype, tensor.parameters):
        # Answered with binary_data_output: the flat values, as a numpy array.
        fields["data"] = codec.to_numpy(tensor).reshape(-1)
    return fields


def failure_record(row: BatchRow, job_id: str, model: str, version: str | None, code: str,
                   message: str) -> dict[str, Any]:
    """The output record of a row that got no answer (malformed here, or no response)."""
    return {
        "index": row.index, "id": row.id, "job_id": job_id, "status": "error",
        "outputs": None, "error": {"code": code, "message": message}, "model": model,
        "version": version, "cost_usd": 0.0, "latency_ms": None,
    }


def job_client(settings: Settings, bootstrap_servers: str, config: BatchJobConfig
               ) -> InferenceClient:
    """The client a job sends through: straight to the model's ``batch`` lane.

    The rows skip the router's hop, and the answers are read in bulk
    (``BATCH_FETCH_WAIT_MS``) until the last rows are sent.
    """
    return InferenceClient(
        settings, bootstrap_servers=bootstrap_servers,
        max_in_flight=max(config.max_in_flight // config.rows_per_request, 1),
        requests_topic=settings.lane_topic(config.model, "batch"),
        bulk_fetch_wait_ms=settings.fetch_wait_ms(BATCH_FETCH_WAIT_MS),
    )


def state_file(settings: Settings, job_id: str) -> Path:
    """Where a job's status is saved on this machine."""
    return settings.state_dir / "jobs" / f"{check_job_id(job_id)}.json"


def control_key(job_id: str) -> bytes:
    """Key of a job's status record on the control topic."""
    return f"{JOB_KEY_PREFIX}{job_id}".encode()


class BatchJob:
    """One run of a batch job through a started InferenceClient."""

    def __init__(
        self,
        settings: Settings,
        client: InferenceClient,
        config: BatchJobConfig,
        *,
        specs: Mapping[str, TensorSpec] | None = None,
        on_progress: Callable[[JobStatus], None] | None = None,
        publish: bool = True,
    ) -> None:
        check_job_id(config.job_id)
        if min(config.max_in_flight, config.reorder_window, config.rows_per_request) < 1:
            raise ValueError("max_in_flight, reorder_window and rows_per_request must be at "
                             "least 1")
        self.settings = settings
        self.client = client
        self.config = config
        self.specs = dict(specs) if specs is not None else None
        self.on_progress = on_progress
        self.publish = publish
        self.status = JobStatus(
            job_id=config.job_id, model=config.model, version=config.version,
            input=str(config.input), output=str(config.output),
        )
        self._counts: Counter[str] = Counter()
        self._t0 = 0.0
        self._advanced = asyncio.Event()
        self._headers = [(JOB_HEADER, config.job_id.encode())]
        # Rows of packs that failed or could not be sent, to go alone; True for the
        # rows already counted as sent.
        self._retry: deque[tuple[Pack, bool]] = deque()

    async def run(self) -> JobStatus:
        """Run the job to the end; returns its final status (``failed`` if any row failed).

        Cancelling it (Ctrl-C) leaves the completed prefix in the output, a rerun's
        starting point, and the status ``interrupted``.
        """
        cfg, st = self.config, self.status
        st.started_at = time.time()
        self._t0 = time.perf_counter()
        st.total = await asyncio.to_thread(count_rows, cfg.input)
        written = await asyncio.to_thread(read_records, cfg.output, repair=True)
        existing = latest_by_id(written)
        done_ids: dict[str, dict[str, Any]] = {}
        for rid, rec in existing.items():
            if cfg.retry_failed and rec.get("status") != "ok":
                continue
            done_ids[rid] = rec
        for rec in done_ids.values():
            self._account(rec)
        st.skipped = len(done_ids)
        names = list(self.specs) if self.specs is not None else None
        rows = await asyncio.to_thread(_pending_rows, cfg.input, cfg.job_id, names, done_ids)
        journal = JournalWriter(journal_path(cfg.output),
                                existing=written if file_format(cfg.output) == "jsonl" else ())
        order = InOrder((r.index for r in rows), self._emit(journal))
        reporter = asyncio.create_task(self._report(), name=f"batch-job-{cfg.job_id}-status")
        try:
            await self._send_all(rows, order)
            st.state = "failed" if st.failed else "completed"
        except BaseException:
            st.state = "interrupted"
            raise
        finally:
            # Answers that land after this (a stopping client fails what is in flight)
            # belong to no run: the rerun sends those rows again.
            journal.close()
            await cancel_and_wait(reporter)
            if st.state != "interrupted":
                await asyncio.to_thread(finalize, cfg.output, journal)
            await self._save(final=True)
        return st

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            await self._save()

    async def _send_all(self, rows: list[BatchRow], order: InOrder) -> None:
        cfg = self.config
        window = cfg.max_in_flight * cfg.reorder_window
        position = {row.index: pos for pos, row in enumerate(rows)}
        # A pack wider than the window would wait for answers to rows not yet sent.
        for pack in packs(self._prepared(rows, order), min(cfg.rows_per_request, window)):
            # Bound the reorder buffer: an early row still waiting holds back the rest.
            await self._retrying_until(order, position[pack.rows[-1].index] - window + 1)
            await self._send(pack, order)
        await self._retrying_until(order, len(rows))

    async def _retrying_until(self, order: InOrder, released: int) -> None:
        """Send the rows waiting to go alone, as they come, until ``released`` rows are out."""
        while True:
            while self._retry:
                pack, counted = self._retry.popleft()
                await self._send(pack, order, again=counted)
            if order.position >= released:
                return
            self._advanced.clear()
            await self._advanced.wait()

    def _prepared(self, rows: list[BatchRow], order: InOrder
                  ) -> Iterator[tuple[BatchRow, list[dict[str, Any]]]]:
        """Each row with its tensors; a row that has none is answered here, as failed."""
        cfg = self.config
        for row in rows:
            tensors = self._tensors(row)
            if isinstance(tensors, tuple):
                order.put(row.index, failure_record(
                    row, cfg.job_id, cfg.model, cfg.version, *tensors))
                continue
            yield row, tensors

    async def _send(self, pack: Pack, order: InOrder, *, again: bool = False) -> None:
        cfg = self.config
        request: dict[str, Any] = {
            "id": pack.request_id(cfg.job_id), "model": cfg.model, "priority": "batch",
            "inputs": pack.inputs(),
            "parameters": {"job_id": cfg.job_id, "row": pack.rows[0].index,
                           **({"rows": pack.size} if pack.size > 1 else {}),
                           **({BINARY_DATA_OUTPUT: True} if cfg.binary_outputs else {})},
        }
        if cfg.version is not None:
            request["version"] = cfg.version
        sent_at = time.perf_counter()
        try:
            fut = await self.client.submit(request, headers=self._headers)
        except InvalidRequest as exc:  # too large to send, say
            if pack.size > 1:
                self._retry.extend((one, False) for one in pack.alone())
                return
            row = pack.rows[0]
            order.put(row.index, failure_record(
                row, cfg.job_id, cfg.model, cfg.version, exc.code, f"row {row.index}: {exc}"))
            return
        if not again:
            self.status.sent += pack.size
        timer = asyncio.get_running_loop().call_later(cfg.wait_timeout_s, fut.cancel)
        fut.add_done_callback(self._on_answer(pack, order, sent_at, timer))

    def _tensors(self, row: BatchRow) -> list[dict[str, Any]] | tuple[str, str]:
        if row.error is not None:
            return row.error
        assert row.inputs is not None
        try:
            return row_tensors(row.inputs, self.specs)
        except InferlineError as exc:
            return exc.code, f"row {row.index}: {exc}"

    def _on_answer(
        self, pack: Pack, order: InOrder, sent_at: float, timer: asyncio.TimerHandle,
    ) -> Callable[[asyncio.Future[InferenceResponse]], None]:
        cfg = self.config

        def fail(code: str, message: Callable[[BatchRow], str]) -> None:
            for row in pack.rows:
                order.put(row.index, failure_record(
                    row, cfg.job_id, cfg.model, cfg.version, code, message(row)))

        def answered(fut: asyncio.Future[InferenceResponse]) -> None:
            timer.cancel()
            if fut.cancelled():
                return fail("CLIENT_TIMEOUT", lambda row: (
                    f"no response for row {row.index} (id {row.id!r}) within "
                    f"wait_timeout_s={cfg.wait_timeout_s:g}"))
            if (exc := fut.exception()) is not None:
                code = exc.code if isinstance(exc, InferlineError) else "INTERNAL"
                return fail(code, lambda row: f"row {row.index}: {exc}")
            resp = fut.result()
            latency_ms = (time.perf_counter() - sent_at) * 1000
            try:
                tensors = [_fields(t) for t in resp.outputs]
            except InferlineError as undecodable:  # a base64 output that does not decode
                reason = f"its answer: {undecodable}"
                return fail("INTERNAL", lambda row: f"row {row.index}: {reason}")
            if pack.size == 1:
                order.put(pack.rows[0].index, result_record(
                    pack.rows[0], cfg.job_id, resp, latency_ms, outputs=tensors))
                return
            if resp.status != "ok":
                # One bad row fails its whole pack: send the rows again one by one, so
                # that each row gets the answer it would have had alone.
                self._retry.extend((one, True) for one in pack.alone())
                self._advanced.set()
                return
            try:
                outputs = split_outputs(tensors, pack.size)
            except ValueError as unsplit:
                reason = f"its pack's answer: {unsplit}"
                return fail("INTERNAL", lambda row: f"row {row.index}: {reason}")
            cost_usd = resp.cost_usd / pack.size
            for row, row_outputs in zip(pack.rows, outputs, strict=True):
                order.put(row.index, result_record(
                    row, cfg.job_id, resp, latency_ms, outputs=row_outputs, cost_usd=cost_usd))

        return answered

    def _emit(self, journal: JournalWriter) -> Callable[[list[dict[str, Any]]], None]:
        def emit(records: list[dict[str, Any]]) -> None:
            if journal.closed:
                return
            journal.write(records)
            for rec in records:
                self._account(rec)
            self._advanced.set()
            self._refresh()

        return emit

    def _account(self, rec: Mapping[str, Any]) -> None:
        st = self.status
        key = outcome_key(rec)
        self._counts[key] += 1
        st.done += 1
        if key == "ok":
            st.ok += 1
        else:
            st.failed += 1
        st.cost_usd += float(rec.get("cost_usd") or 0.0)

    def _refresh(self) -> None:
        st = self.status
        st.elapsed_s = time.perf_counter() - self._t0
        processed = st.done - st.skipped
        st.throughput_rps = processed / st.elapsed_s if st.elapsed_s > 0 else 0.0
        st.counts = dict(sorted(self._counts.items()))
        st.updated_at = time.time()
        if self.on_progress is not None:
            self.on_progress(st)

    async def _save(self, *, final: bool = False) -> None:
        self._refresh()
        data = self.status.to_json()
        await asyncio.to_thread(_write_atomic, state_file(self.settings, self.config.job_id), data)
        if self.publish:
            try:
                await self.client.send_raw(
                    data, key=control_key(self.config.job_id),
                    topic=self.settings.topic("control"))
            except BrokerError:
                # A status update may be lost while the broker is away; the last one
                # must not be.
                if final:
                    raise


def _pending_rows(
    path: Path, job_id: str, names: list[str] | None, done: Mapping[str, Any]
) -> list[BatchRow]:
    """The rows of ``path`` whose ids are not in ``done``; ids must be unique."""
    seen: dict[str, int] = {}
    rows: list[BatchRow] = []
    for row in read_rows(path, job_id, names):
        first = seen.setdefault(row.id, row.index)
        if first != row.index:
            raise InvalidRequest(
                f"rows {first} and {row.index} of {path.name} share the id {row.id!r}; "
                "ids must be unique within a job", id=row.id)
        if row.id not in done:
            rows.append(row)
    return rows


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def load_status(
    settings: Settings, job_id: str, *, bootstrap_servers: str | None = None,
    idle_ms: int = 1000,
) -> JobStatus | None:
    """A job's latest status: the state file, or the control topic's record if newer.

    With ``bootstrap_servers`` the control topic is read from the beginning to its
    end; None when neither place knows the job.
    """
    found: list[JobStatus] = []
    path = state_file(settings, job_id)
    if path.exists():
        found.append(JobStatus.from_json(await asyncio.to_thread(path.read_bytes)))
    if bootstrap_servers:
        record = await _read_control(settings, bootstrap_servers, control_key(job_id), idle_ms)
        if record is not None:
            found.append(JobStatus.from_json(record))
    return max(found, key=lambda s: s.updated_at) if found else None


async def _read_control(
    settings: Settings, bootstrap_servers: str, key: bytes, idle_ms: int
) -> bytes | None:
    topic = settings.topic("control")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
        fetch_max_wait_ms=settings.fetch_max_wait_ms, **settings.kafka_security(),
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise BrokerError(f"cannot read {topic!r} from {bootstrap_servers}: {exc!r}") from exc
    latest: bytes | None = None
    try:
        parts = await _partitions(consumer, topic)
        if not parts:
            return None
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            batches = await consumer.getmany(timeout_ms=idle_ms)
            if not batches:
                break
            for records in batches.values():
                for rec in records:
                    if rec.key == key and rec.value is not None:
                        latest = rec.value
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
    return latest


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    consumer._client.add_topic(topic)
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic) or set()
