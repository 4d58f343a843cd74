"""Reading validated responses: the parser the clients share, and ResponseConsumer.

:class:`ResponseConsumer` is for downstream services that read a shared
response topic in a consumer group.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple, Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError
from pydantic import ValidationError

from pipeline.consumer import leave_first_generation, quietly
from pipeline.errors import BrokerError
from pipeline.settings import Settings
from pipeline.tasks import Lifecycle
from schemas.messages import InferenceResponse

log = logging.getLogger(__name__)

_POLL_MS = 500
_ERROR_BACKOFF_MS = 200


class ResponseParser:
    """Counts records that are not InferenceResponses and logs each kind of fault once."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.count = 0
        self._kinds: set[str] = set()

    def parse(
        self, value: bytes | None, topic: str, partition: int, offset: int
    ) -> InferenceResponse | None:
        try:
            return InferenceResponse.model_validate_json(value or b"")
        except ValidationError as exc:
            self.count += 1
            kind = exc.errors()[0]["type"] if exc.error_count() else "invalid"
            if kind not in self._kinds:
                self._kinds.add(kind)
                log.warning(
                    "%s: skipping a record that is not an InferenceResponse (%s at %s[%d]@%d): "
                    "%s; further records with this fault are counted, not logged",
                    self.where, kind, topic, partition, offset, exc,
                )
            return None


class ReceivedResponse(NamedTuple):
    """One response read by a :class:`ResponseConsumer`, with where it came from."""

    response: InferenceResponse
    headers: tuple[tuple[str, bytes], ...]
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


class ResponseConsumer(Lifecycle):
    """Read validated InferenceResponses from response topics in a consumer group.

    Iterating yields :class:`ReceivedResponse` items (the response plus the record's
    headers and position). Delivery is at-least-once: a record counts as processed
    once the iterator is asked for the next one, and offsets of processed records
    are committed before each new fetch and on :meth:`stop`. After a crash or a
    rebalance the uncommitted tail is delivered again, so deduplicate by
    ``response.id``. Records that are not InferenceResponses are skipped, logged
    once per kind of fault and counted in :attr:`invalid`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        bootstrap_servers: str,
        topics: Sequence[str] | None = None,
        group_id: str,
        from_beginning: bool = False,
    ) -> None:
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self.topics = list(topics) if topics is not None else [settings.topic("responses")]
        self.group_id = group_id
        self.from_beginning = from_beginning
        self._consumer: Any = None
        # In record order; None stands for a skipped invalid record, so that it counts
        # as processed only once everything before it has been.
        self._buffer: collections.deque[tuple[TopicPartition, int, ReceivedResponse | None]] = (
            collections.deque()
        )
        self._last: ReceivedResponse | None = None
        self._processed: dict[TopicPartition, int] = {}
        self._invalid = ResponseParser(f"response consumer {group_id}")
        self._lock = asyncio.Lock()
        self.received = 0

    @property
    def invalid(self) -> int:
        """Records skipped because they were not valid InferenceResponses."""
        return self._invalid.count

    async def start(self) -> None:
        """Join the consumer group; idempotent."""
        async with self._lock:
            if self._consumer is not None:
                return
            s = self.settings
            consumer = AIOKafkaConsumer(
                *self.topics, bootstrap_servers=self.bootstrap_servers, group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest" if self.from_beginning else "latest",
                session_timeout_ms=s.session_timeout_ms,
                rebalance_timeout_ms=s.rebalance_timeout_ms,
                heartbeat_interval_ms=s.heartbeat_interval_ms,
                fetch_max_wait_ms=s.fetch_max_wait_ms,
                **s.kafka_security(),
            )
            try:
                await consumer.start()
            except BaseException as exc:
                await quietly(consumer.stop())
                if isinstance(exc, KafkaError):
                    raise BrokerError(
                        f"cannot start a response consumer on {self.bootstrap_servers}: {exc!r}"
                    ) from exc
                raise
            self._consumer = consumer

    async def stop(self) -> None:
        """Commit what was processed, leave the group and disconnect; idempotent."""
        async with self._lock:
            consumer, self._consumer = self._consumer, None
            if consumer is None:
                return
            await self._commit(consumer)
            await leave_first_generation(consumer)
            await quietly(consumer.stop())
            self._buffer.clear()
            self._last = None

    async def commit(self) -> None:
        """Commit everything yielded so far, including the latest item."""
        self._mark_processed()
        if self._consumer is not None:
            await self._commit(self._consumer)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ReceivedResponse:
        self._mark_processed()
        while True:
            while self._buffer:
                tp, offset, item = self._buffer.popleft()
                if item is None:
                    self._processed[tp] = offset + 1
                    continue
                self._last = item
                self.received += 1
                return item
            consumer = self._consumer
            if consumer is None:
                raise StopAsyncIteration
            await self._commit(consumer)
            try:
                batches = await consumer.getmany(timeout_ms=_POLL_MS)
            except ConsumerStoppedError:
                raise StopAsyncIteration from None
            except KafkaError as exc:
                log.warning("response consumer %s: fetch failed: %r", self.group_id, exc)
                await asyncio.sleep(_ERROR_BACKOFF_MS / 1000)
                continue
            for tp, records in batches.items():
                for r in records:
                    response = self._invalid.parse(r.value, r.topic, r.partition, r.offset)
                    item = None if response is None else ReceivedResponse(
                        response, tuple(r.headers), r.topic, r.partition, r.offset, r.timestamp
                    )
                    self._buffer.append((tp, r.offset, item))

    def _mark_processed(self) -> None:
        if self._last is not None:
            tp = TopicPartition(self._last.topic, self._last.partition)
            self._processed[tp] = self._last.offset + 1
            self._last = None

    async def _commit(self, consumer: Any) -> None:
        if not self._processed:
            return
        # Partitions lost in a rebalance cannot be committed by us any more; their
        # new owner re-reads from the last commit (at-least-once).
        assigned = consumer.assignment()
        offsets = {tp: off for tp, off in self._processed.items() if tp in assigned}
        self._processed.clear()
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            log.warning("response consumer %s: commit failed, records may be redelivered: %r",
                        self.group_id, exc)
