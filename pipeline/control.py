"""The control topic (``<prefix>.control``, compacted): who is ready, what is deployed.

Three kinds of record, JSON values told apart by ``kind`` and keyed so that
compaction keeps the latest of each:

- ``worker:<worker id>`` (:class:`WorkerReadiness`): a worker's pool and, per
  version it serves, whether it is warm, on which execution provider and after
  how long a warm-up. Published after warm-up and before the worker joins its
  consumer group, republished every ``control_heartbeat_ms`` as a heartbeat, and
  once more with ``state = "stopping"`` when it stops.
- ``deployment:<model>`` (:class:`DeploymentState`): the stable version and any
  candidate, with its canary and shadow percentages and the rollout's state.
- ``decision:<model>:<n>`` (:class:`Decision`): each rollout decision (start,
  step, promote, rollback, abort) with its reason and the measured figures.

Batch jobs publish their progress on the same topic under ``job:<job id>``
(:mod:`pipeline.batchjob` writes and reads those); the view passes them over.

:class:`ControlPublisher` writes records; :class:`ControlView` reads the topic
from the beginning and keeps the latest record per key, treating a worker whose
heartbeat is older than ``control_expiry_ms`` as gone. A worker's heartbeat is
:class:`pipeline.readiness.ReadinessAnnouncer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pipeline.consumer import quietly
from pipeline.errors import BrokerError
from pipeline.outbox import new_producer
from pipeline.rollout import Figures
from pipeline.settings import Settings
from pipeline.tasks import Lifecycle, cancel_and_wait
from pipeline.topics import ensure_topics

# How long an idle fetch of the control topic waits for news.
CONTROL_FETCH_WAIT_MS = 200

log = logging.getLogger("inferline.control")

RolloutState = Literal["stable", "canary", "shadow", "promoted", "rolled_back", "aborted"]
ACTIVE_STATES: tuple[RolloutState, ...] = ("canary", "shadow")
Action = Literal["start", "step", "promote", "rollback", "abort", "shadow_passed"]


# Keys of batch jobs' status records: not control records, and not this view's.
JOB_KEY_PREFIX = "job:"


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of every timestamp on the control topic."""
    return int(time.time() * 1000)


class VersionReadiness(BaseModel):
    """One model version on one worker."""

    model_config = ConfigDict(extra="forbid")

    model: str
    version: str
    warm: bool
    execution_provider: str = ""
    warmup_ms: float = 0.0


class WorkerReadiness(BaseModel):
    """A worker's readiness record (key ``worker:<worker_id>``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["worker"] = "worker"
    worker_id: str
    pool: str
    state: Literal["ready", "stopping"] = "ready"
    versions: list[VersionReadiness] = Field(default_factory=list)
    heartbeat_ms: int = Field(default=2000, ge=1)
    at_ms: int = Field(default_factory=now_ms)

    @property
    def key(self) -> str:
        """The record key."""
        return f"worker:{self.worker_id}"


class DeploymentState(BaseModel):
    """What a model serves (key ``deployment:<model>``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["deployment"] = "deployment"
    model: str
    stable: str
    candidate: str | None = None
    canary_percent: float = Field(default=0.0, ge=0, le=100)
    shadow_percent: float = Field(default=0.0, ge=0, le=100)
    state: RolloutState = "stable"
    rollout_id: str = ""
    reason: str = ""
    figures: Figures | None = None
    step_started_ms: int = Field(default_factory=now_ms)
    updated_at_ms: int = Field(default_factory=now_ms)
    updated_by: str = ""

    @property
    def key(self) -> str:
        """The record key."""
        return f"deployment:{self.model}"

    @property
    def active(self) -> bool:
        """Whether a rollout is in progress (canary or shadow)."""
        return self.state in ACTIVE_STATES and self.candidate is not None


class Decision(BaseModel):
    """One rollout decision (key ``decision:<model>:<seq>``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["decision"] = "decision"
    model: str
    seq: int = Field(ge=1)
    action: Action
    stable: str
    candidate: str | None = None
    from_percent: float = 0.0
    to_percent: float = 0.0
    rollout_id: str = ""
    reason: str = ""
    figures: Figures | None = None
    by: str = ""
    at_ms: int = Field(default_factory=now_ms)

    @property
    def key(self) -> str:
        """The record key."""
        return f"decision:{self.model}:{self.seq}"


ControlRecord = WorkerReadiness | DeploymentState | Decision
_RECORD: TypeAdapter[ControlRecord] = TypeAdapter(
    Annotated[ControlRecord, Field(discriminator="kind")]
)


def parse_record(value: bytes) -> ControlRecord:
    """A control record from its JSON value; raises pydantic's ValidationError."""
    return _RECORD.validate_json(value)


def encode_record(record: ControlRecord) -> tuple[bytes, bytes]:
    """The key and value a record is published with."""
    return record.key.encode(), record.model_dump_json().encode()


async def ensure_control_topic(settings: Settings, bootstrap_servers: str) -> None:
    """Create the compacted control topic if it is missing."""
    topic = settings.topic("control")
    await ensure_topics(settings, bootstrap_servers, [topic], compacted=[topic])


class ControlPublisher(Lifecycle):
    """Writes control records; each ``publish`` returns once the broker has it."""

    def __init__(self, settings: Settings, bootstrap_servers: str) -> None:
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self.topic = settings.topic("control")
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Connect (idempotent)."""
        if self._producer is not None:
            return
        s = self.settings
        await ensure_control_topic(s, self.bootstrap_servers)
        # One key, one partition (the CRC32 partitioner): compaction and readers
        # then see a key's records in the order they were written.
        producer = new_producer(
            s, self.bootstrap_servers, client_id=f"inferline-control-{s.worker_id}"
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await quietly(producer.stop())
            raise BrokerError(f"cannot connect to {self.bootstrap_servers}: {exc!r}") from exc
        self._producer = producer

    async def stop(self) -> None:
        """Disconnect (idempotent)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await quietly(producer.stop())

    async def publish(self, record: ControlRecord) -> None:
        """Write one record and wait for the broker's acknowledgement."""
        if self._producer is None:
            raise BrokerError("the control publisher is not started; call start() first")
        key, value = encode_record(record)
        try:
            await self._producer.send_and_wait(self.topic, value, key=key)
        except KafkaError as exc:
            raise BrokerError(f"cannot publish {record.key} to {self.topic!r}: {exc!r}") from exc


class ControlView(Lifecycle):
    """The latest control record per key, read from the beginning and kept up to date.

    No consumer group: every view reads every partition. ``revision`` grows with
    every record applied, so users can rebuild what they derive only on change
    (expiry still needs a look at the clock: see :meth:`workers`).
    """

    def __init__(
        self, settings: Settings, bootstrap_servers: str, *, expiry_ms: int | None = None
    ) -> None:
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self.topic = settings.topic("control")
        self.expiry_ms = expiry_ms if expiry_ms is not None else settings.control_expiry_ms
        self.records: dict[str, ControlRecord] = {}
        self.revision = 0
        self.invalid = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    async def start(self, *, catch_up_s: float = 30.0) -> None:
        """Read the topic up to its current end, then follow it (idempotent)."""
        if self._task is not None:
            return
        s = self.settings
        await ensure_control_topic(s, self.bootstrap_servers)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"inferline-control-view-{s.worker_id}",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Control records are rare: an idle fetch every 10 ms in every router and
            # worker cost the broker more than all else an idle pipeline does.
            fetch_max_wait_ms=s.fetch_wait_ms(CONTROL_FETCH_WAIT_MS),
            **s.kafka_security(),
        )
        try:
            await consumer.start()
            partitions = await _partitions(consumer, self.topic)
            tps = [TopicPartition(self.topic, p) for p in partitions]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            deadline = time.monotonic() + catch_up_s
            while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"control topic {self.topic!r} not read to its end within {catch_up_s}s"
                    )
                self._apply_batch(await consumer.getmany(timeout_ms=200))
        except BaseException as exc:
            await quietly(consumer.stop())
            if isinstance(exc, KafkaError):
                raise BrokerError(f"cannot read {self.topic!r}: {exc!r}") from exc
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._follow(consumer), name="control-view")

    async def stop(self) -> None:
        """Stop following (idempotent)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await quietly(consumer.stop())

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        failures = 0
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=500)
                failures = 0
            except KafkaError as exc:
                failures += 1
                if failures == 1 or failures % 64 == 0:
                    log.warning("reading %s failed %d time(s): %r", self.topic, failures, exc)
                await asyncio.sleep(min(0.1 * failures, 2.0))
                continue
            if batch:
                self._apply_batch(batch)
                async with self._changed:
                    self._changed.notify_all()

    def _apply_batch(self, batch: dict[Any, list[Any]]) -> None:
        for records in batch.values():
            for r in records:
                self.apply(r.key, r.value)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one record of the topic: the latest per key wins; null deletes."""
        if key is None:
            return
        name = key.decode("utf-8", "replace")
        if name.startswith(JOB_KEY_PREFIX):
            return
        if value is None:
            self.records.pop(name, None)
        else:
            try:
                self.records[name] = parse_record(value)
            except ValidationError as exc:
                self.invalid += 1
                log.warning("ignoring invalid control record %r: %s", name, exc)
                return
        self.revision += 1

    def remember(self, record: ControlRecord) -> None:
        """Apply a record this process has just published, before it comes back to the view."""
        self.records[record.key] = record
        self.revision += 1

    async def wait_for(self, predicate: Callable[[ControlView], bool], timeout_s: float) -> bool:
        """Wait until ``predicate(self)`` holds (checked on every change and every 0.5 s)."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
        return True

    # -- queries ----------------------------------------------------------------------

    def workers(self, *, at_ms: int | None = None, include_gone: bool = False) -> list[
        WorkerReadiness
    ]:
        """Workers that are ready and whose heartbeat is recent (all with ``include_gone``)."""
        now = at_ms if at_ms is not None else now_ms()
        found = [r for r in self.records.values() if isinstance(r, WorkerReadiness)]
        if include_gone:
            return found
        return [r for r in found if r.state == "ready" and not self._expired(r, now)]

    def _expired(self, r: WorkerReadiness, now: int) -> bool:
        # A worker may beat more slowly than this view expects: give it three beats.
        return now - r.at_ms > max(self.expiry_ms, 3 * r.heartbeat_ms)

    def warm_workers(self, model: str, version: str, *, at_ms: int | None = None) -> list[str]:
        """Ids of the live workers on which ``model:version`` is warm."""
        return sorted(
            w.worker_id
            for w in self.workers(at_ms=at_ms)
            if any(v.model == model and v.version == version and v.warm for v in w.versions)
        )

    def warm_versions(self, *, at_ms: int | None = None) -> dict[str, set[str]]:
        """Per model, the versions at least one live worker has warm."""
        warm: dict[str, set[str]] = {}
        for w in self.workers(at_ms=at_ms):
            for v in w.versions:
                if v.warm:
                    warm.setdefault(v.model, set()).add(v.version)
        return warm

    def deployment(self, model: str) -> DeploymentState | None:
        """The deployment record of ``model``, if any."""
        r = self.records.get(f"deployment:{model}")
        return r if isinstance(r, DeploymentState) else None

    def deployments(self) -> dict[str, DeploymentState]:
        """Every deployment record, by model."""
        return {r.model: r for r in self.records.values() if isinstance(r, DeploymentState)}

    def decisions(self, model: str | None = None) -> list[Decision]:
        """Decision records (of ``model``, or all), oldest first."""
        found = [
            r for r in self.records.values()
            if isinstance(r, Decision) and (model is None or r.model == model)
        ]
        return sorted(found, key=lambda d: (d.at_ms, d.seq))

    def next_seq(self, model: str) -> int:
        """The sequence number for the next decision about ``model``."""
        return 1 + max((d.seq for d in self.decisions(model)), default=0)


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    deadline = time.monotonic() + 10
    while True:
        consumer._client.add_topic(topic)
        await consumer._client.force_metadata_update()
        found = consumer.partitions_for_topic(topic)
        if found:
            return sorted(found)
        if time.monotonic() > deadline:
            raise BrokerError(f"topic {topic!r} has no partitions")
        await asyncio.sleep(0.1)
