"""Reading ``<prefix>.metrics`` (windowed stats) and ``<prefix>.telemetry`` back.

A :class:`TopicFeed` reads a topic from its beginning, or from a point in time,
without a consumer group (reports and live views must not take partitions from
each other): :meth:`TopicFeed.catch_up` returns every record up to the end
offsets at the time of the call, :meth:`TopicFeed.poll` whatever arrived since.
:class:`MetricsFeed` and :class:`TelemetryFeed` decode the two topics' records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from pipeline.errors import BrokerError
from pipeline.rollup import WindowStats, decode_stats
from pipeline.settings import Settings
from pipeline.tasks import Lifecycle
from pipeline.telemetry import Heartbeat, RequestSummary, decode_record

T = TypeVar("T")

log = logging.getLogger("inferline.metricsfeed")


class TopicFeed(Lifecycle, Generic[T]):
    """Every record of a topic (from ``since_ms`` when given), then the new ones."""

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        topic: str,
        decode: Callable[[bytes], T],
        *,
        since_ms: int | None = None,
    ) -> None:
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.decode = decode
        self.since_ms = since_ms
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []
        self.skipped = 0

    async def start(self) -> None:
        """Connect and seek to the beginning of every partition (idempotent)."""
        if self._consumer is not None:
            return
        s = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            enable_auto_commit=False,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            **s.kafka_security(),
        )
        try:
            await consumer.start()
            parts = await self._partitions(consumer)
            self._tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(self._tps)
            await consumer.seek_to_beginning(*self._tps)
            if self.since_ms is not None:
                found = await consumer.offsets_for_times({tp: self.since_ms for tp in self._tps})
                for tp, at in found.items():
                    if at is None:  # nothing that recent: start at the end
                        await consumer.seek_to_end(tp)
                    else:
                        consumer.seek(tp, at.offset)
        except KafkaError as exc:
            await consumer.stop()
            raise BrokerError(
                f"cannot read {self.topic} from {self.bootstrap_servers}: {exc!r}"
            ) from exc
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    async def _partitions(self, consumer: AIOKafkaConsumer) -> set[int]:
        consumer._client.add_topic(self.topic)
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(self.topic)
        if not parts:
            raise BrokerError(
                f"topic {self.topic} does not exist on {self.bootstrap_servers}; "
                "are workers and a stats agent (`inferline serve --role stats`) running?",
                topic=self.topic,
            )
        return set(parts)

    async def stop(self) -> None:
        """Disconnect (idempotent)."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def catch_up(self) -> list[T]:
        """Every record up to the topic's end as of now."""
        consumer = self._require()
        end = await consumer.end_offsets(self._tps)
        out: list[T] = []
        while True:
            positions = [await consumer.position(tp) for tp in self._tps]
            if all(pos >= end[tp] for pos, tp in zip(positions, self._tps, strict=True)):
                return out
            out += self._decode(await consumer.getmany(timeout_ms=500))

    async def poll(self, timeout_ms: int = 500) -> list[T]:
        """Records that arrived since the last call (waits up to ``timeout_ms`` for some)."""
        return self._decode(await self._require().getmany(timeout_ms=timeout_ms))

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise BrokerError("the metrics feed is not started; call start() first")
        return self._consumer

    def _decode(self, batch: dict[Any, list[Any]]) -> list[T]:
        out: list[T] = []
        for records in batch.values():
            for rec in records:
                try:
                    out.append(self.decode(rec.value or b""))
                except ValidationError as exc:
                    self.skipped += 1
                    log.warning("skipping a malformed record at %s[%d]@%d: %s",
                                rec.topic, rec.partition, rec.offset, exc)
        return out


class MetricsFeed(TopicFeed[WindowStats]):
    """The windowed stats on ``<prefix>.metrics``."""

    def __init__(
        self, settings: Settings, bootstrap_servers: str, *, since_ms: int | None = None
    ) -> None:
        super().__init__(settings, bootstrap_servers, settings.topic("metrics"), decode_stats,
                         since_ms=since_ms)


class TelemetryFeed(TopicFeed[RequestSummary | Heartbeat]):
    """The worker telemetry on ``<prefix>.telemetry``."""

    def __init__(
        self, settings: Settings, bootstrap_servers: str, *, since_ms: int | None = None
    ) -> None:
        super().__init__(settings, bootstrap_servers, settings.topic("telemetry"), decode_record,
                         since_ms=since_ms)
