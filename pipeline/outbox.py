"""Producing many records at once, as one record batch per topic-partition.

``AIOKafkaProducer.send`` creates a future and a ``RecordMetadata`` per record
and schedules a callback per delivery; for small records that bookkeeping cost
more than encoding them. An :class:`Outbox` collects the records of one
handler step, partitions them itself (with :func:`crc32_partitioner`, the same
placement the producer would choose), fills one ``BatchBuilder`` per partition
and awaits one future per batch. Concurrent outboxes of one producer share a
:class:`PartitionSender`, which merges what they queue for a partition into one
batch per round trip.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import time
import weakref
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from pipeline.responses import DLQ_CODE, DLQ_MESSAGE, DLQ_SOURCE
from pipeline.settings import Settings
from pipeline.topics import crc32_partitioner

Headers = Sequence[tuple[str, bytes]]
Record = tuple[bytes | None, bytes, int | None, Headers]

_PARTITIONS_TTL_S = 30.0
_UNAVAILABLE_TTL_S = 60.0


def new_producer(
    settings: Settings, bootstrap_servers: str, *, client_id: str
) -> AIOKafkaProducer:
    """An unstarted producer with the project's options.

    acks=all without idempotence (the embedded broker refuses InitProducerId),
    inferline's CRC32 partitioner (a key's records stay on one partition), the
    settings' linger, batch and request sizes and security.
    """
    s = settings
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=False,
        linger_ms=s.linger_ms,
        max_batch_size=s.producer_batch_bytes,
        max_request_size=max(s.max_request_bytes * 2, 1_048_576),
        partitioner=crc32_partitioner,
        **s.kafka_security(),
    )


class TopicUnavailable(Exception):
    """No metadata for a topic in time: it does not exist and cannot be auto-created."""


class PartitionCache:
    """Partition ids per topic from the producer's metadata, refreshed now and then.

    A topic whose metadata does not come within ``metadata_timeout_ms`` is
    remembered as unavailable for a minute, so that a stream of requests naming
    a reply topic that cannot exist costs one wait, not one wait each.
    """

    def __init__(self, producer: AIOKafkaProducer, *, metadata_timeout_ms: float = 5000) -> None:
        self.producer = producer
        self.metadata_timeout_s = metadata_timeout_ms / 1000
        self._cache: dict[str, tuple[list[int], float]] = {}
        self._unavailable: dict[str, tuple[str, float]] = {}

    async def get(self, topic: str) -> list[int]:
        """Sorted partition ids of ``topic``; raises :class:`TopicUnavailable`."""
        hit = self._cache.get(topic)
        now = time.monotonic()
        if hit is not None and now - hit[1] < _PARTITIONS_TTL_S:
            return hit[0]
        bad = self._unavailable.get(topic)
        if bad is not None and now - bad[1] < _UNAVAILABLE_TTL_S:
            raise TopicUnavailable(bad[0])
        try:
            found = await asyncio.wait_for(
                self.producer.partitions_for(topic), self.metadata_timeout_s
            )
        except (TimeoutError, KafkaError) as exc:
            reason = f"topic {topic!r} unavailable: {exc!r}"
            self._unavailable[topic] = (reason, now)
            raise TopicUnavailable(reason) from exc
        parts = sorted(found)
        self._cache[topic] = (parts, now)
        return parts


class Outbox:
    """Records of one step, sent together; :meth:`flush` returns once all are acknowledged."""

    __slots__ = ("_dead_letter_topic", "_partitions", "_producer", "_records")

    def __init__(
        self,
        producer: AIOKafkaProducer,
        partitions: PartitionCache,
        *,
        dead_letter_topic: str | None = None,
    ) -> None:
        self._producer = producer
        self._partitions = partitions
        self._dead_letter_topic = dead_letter_topic
        self._records: dict[str, list[Record]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._records.values())

    def add(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        *,
        timestamp_ms: int | None = None,
        headers: Headers = (),
    ) -> None:
        """Queue one record for the next flush."""
        self._records.setdefault(topic, []).append((key, value, timestamp_ms, headers))

    async def flush(self) -> None:
        """Send everything queued and wait until the broker has acknowledged it.

        Records for a topic that is unavailable go to the dead-letter topic (when
        one is set) with the reason in their headers: a reply topic that cannot be
        written must not hold up everyone else's answers.
        """
        records, self._records = self._records, {}
        try:
            await self._flush(records)
        except BaseException:
            # Keep them for a retry: a caller that flushes again re-sends them all
            # (at-least-once: some may then be delivered twice, none lost).
            for topic, items in records.items():
                self._records.setdefault(topic, [])[:0] = items
            raise

    async def _flush(self, records: dict[str, list[Record]]) -> None:
        # Metadata first, for every topic, then the sends: a metadata request for a
        # new topic while a batch is in flight made the embedded broker answer that
        # batch NotLeaderForPartition until the request timed out.
        placed: list[tuple[str, list[int], list[Record]]] = []
        diverted: list[Record] = []
        for topic, items in records.items():
            try:
                placed.append((topic, await self._partitions.get(topic), items))
            except TopicUnavailable as exc:
                if self._dead_letter_topic is None or topic == self._dead_letter_topic:
                    raise
                why = [(DLQ_CODE, b"UNDELIVERABLE"), (DLQ_MESSAGE, str(exc).encode()),
                       (DLQ_SOURCE, topic.encode())]
                diverted += [(k, v, ts, [*h, *why]) for k, v, ts, h in items]
        if diverted:
            assert self._dead_letter_topic is not None
            dlq = self._dead_letter_topic
            placed.append((dlq, await self._partitions.get(dlq), diverted))
        deliveries: list[asyncio.Future[None]] = []
        sender = sender_for(self._producer)
        for topic, parts, items in placed:
            by_part: dict[int, list[Record]] = {}
            for item in items:
                by_part.setdefault(crc32_partitioner(item[0], parts, parts), []).append(item)
            for partition, recs in by_part.items():
                deliveries.append(sender.send(topic, partition, recs))
        if deliveries:
            # Every delivery settles before the first failure is raised: a retry of the
            # whole outbox must not race a send of the same records still in progress.
            results = await asyncio.gather(*deliveries, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result


class _Pending:
    """Records of one flush for one partition, and the future its flush awaits."""

    __slots__ = ("future", "records")

    def __init__(self, records: list[Record], future: asyncio.Future[None]) -> None:
        self.records = records
        self.future = future


class PartitionSender:
    """Coalesces the records of concurrent flushes into one batch per partition.

    ``AIOKafkaProducer.send_batch`` queues at most one batch per partition: a
    second waits until the first is on the wire, and many flushes racing for one
    partition each wait their turn, one round trip apiece, and time out early
    under load (the producer subtracts the whole elapsed time from the timeout
    at every wake-up). Here each partition has at most one sending task; it
    takes everything queued for its partition since its last send, so N
    concurrent flushes cost one round trip, not N.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._queues: dict[tuple[str, int], list[_Pending]] = {}
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}

    def send(self, topic: str, partition: int, records: list[Record]) -> asyncio.Future[None]:
        """Queue ``records`` for ``topic``/``partition``; the future resolves on their ack."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        tp = (topic, partition)
        self._queues.setdefault(tp, []).append(_Pending(records, future))
        if tp not in self._tasks:
            self._tasks[tp] = asyncio.create_task(self._drain(tp))
        return future

    async def _drain(self, tp: tuple[str, int]) -> None:
        queue = self._queues[tp]
        try:
            while queue:
                taken = queue[:]
                queue.clear()
                try:
                    deliveries = await self._send(tp[0], tp[1], [
                        r for pending in taken for r in pending.records
                    ])
                except BaseException as exc:
                    for pending in taken:
                        if not pending.future.done():
                            pending.future.set_exception(_copy_error(exc))
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                asyncio.gather(*deliveries).add_done_callback(functools.partial(_settle, taken))
        finally:
            del self._tasks[tp]
            # Cancelled with records still queued: their flushes fail rather than wait
            # forever on futures no task would settle.
            for pending in self._queues.pop(tp):
                if not pending.future.done():
                    pending.future.set_exception(RuntimeError("sender stopped"))

    async def _send(
        self, topic: str, partition: int, recs: list[Record]
    ) -> list[asyncio.Future[Any]]:
        futures: list[asyncio.Future[Any]] = []
        send = self._producer.send_batch
        now_ms = int(time.time() * 1000)
        batch = self._producer.create_batch()
        for key, value, ts, headers in recs:
            appended = batch.append(
                timestamp=ts if ts is not None else now_ms, key=key, value=value,
                headers=list(headers),
            )
            if appended is None:
                # Full: ship it and start another; a single record larger than a
                # whole batch still goes out alone in a batch of its own.
                if batch.record_count():
                    futures.append(await send(batch, topic, partition=partition))
                batch = self._producer.create_batch()
                if batch.append(timestamp=ts if ts is not None else now_ms, key=key,
                                value=value, headers=list(headers)) is None:
                    raise ValueError(
                        f"a record of {len(value)} bytes for {topic!r} does not fit in a batch; "
                        "raise producer_batch_bytes or lower max_request_bytes"
                    )
        if batch.record_count():
            futures.append(await send(batch, topic, partition=partition))
        return futures


def _copy_error(exc: BaseException) -> BaseException:
    # One exception instance raised in several awaiting tasks would collect their
    # tracebacks into one another; each waiter gets its own.
    if isinstance(exc, asyncio.CancelledError):
        return RuntimeError("sender cancelled")
    try:
        return copy.copy(exc)
    except Exception:
        return RuntimeError(repr(exc))


def _settle(taken: list[_Pending], done: asyncio.Future[Any]) -> None:
    exc = None if done.cancelled() else done.exception()
    for pending in taken:
        if pending.future.done():
            continue
        if done.cancelled():
            pending.future.set_exception(RuntimeError("delivery cancelled"))
        elif exc is not None:
            pending.future.set_exception(_copy_error(exc))
        else:
            pending.future.set_result(None)


_SENDERS: weakref.WeakKeyDictionary[AIOKafkaProducer, PartitionSender] = (
    weakref.WeakKeyDictionary()
)


def sender_for(producer: AIOKafkaProducer) -> PartitionSender:
    """The one :class:`PartitionSender` of ``producer`` (made on first use)."""
    sender = _SENDERS.get(producer)
    if sender is None:
        sender = _SENDERS[producer] = PartitionSender(producer)
    return sender
