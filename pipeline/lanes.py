"""The worker's consumer of priority lanes: fetch, pause, resume, commit what is answered.

Unlike :class:`pipeline.consumer.BatchConsumer`, which hands a polled batch to
a handler and commits when the handler returns, this consumer hands records to
the worker's scheduler and goes straight back to polling, so that a
high-priority record arriving while a long batch computes is seen at once. The
scheduler answers records in its own order, so commits follow a *watermark* per
partition: the offset up to which every record has been answered (and its
answer acknowledged by the broker). A crash thus replays only unanswered work
and the answered records after the first unanswered one.

Lanes the scheduler wants paused are paused in the Kafka client: their backlog
waits in Kafka, and the consumer keeps heartbeating. Each lane's backlog in
Kafka is its end less the next offset to hand over: the end of a partition being
fetched comes with each fetch response; that of a paused one is asked of the
broker every ``lag_interval_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from pipeline.consumer import GroupMember
from pipeline.settings import Settings
from pipeline.tasks import cancel_and_wait

log = logging.getLogger("inferline.lanes")

Key = tuple[str, int]
OnRecords = Callable[[Sequence[Any]], None]
OnRevoked = Callable[[set[Key]], list[tuple[str, int, int]]]


class _Track:
    """Offsets of one partition taken and not yet committed."""

    __slots__ = ("committed", "done", "dropped", "offsets")

    def __init__(self) -> None:
        self.offsets: deque[int] = deque()
        self.done: set[int] = set()
        self.dropped: set[int] = set()
        self.committed = -1

    def watermark(self) -> int | None:
        """Next offset to commit: everything before it is answered."""
        while self.offsets and self.offsets[0] in self.done:
            self.done.discard(self.offsets.popleft())
        if self.offsets:
            return self.offsets[0]
        return None

    def open(self) -> int:
        """Records taken and neither answered nor dropped."""
        return len(self.offsets) - len(self.done) - len(self.dropped)


class _LaneRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: LaneConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.owner.release(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.owner.assigned.set()
        parts = sorted((tp.topic, tp.partition) for tp in assigned)
        log.info("%s assigned %s", self.owner.name, parts)


class LaneConsumer(GroupMember):
    """Feeds lane records to ``on_records`` and commits per-partition watermarks."""

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        *,
        topics: Sequence[str],
        group_id: str,
        on_records: OnRecords,
        on_revoked: OnRevoked,
        name: str = "worker",
        lag_interval_ms: float = 250.0,
        max_records: int | None = None,
        topic_rank: Mapping[str, int] | None = None,
        max_records_by_rank: Mapping[int, int] | None = None,
        fetch_wait_ms: Callable[[], int] | None = None,
    ) -> None:
        """``max_records_by_rank`` caps a chunk of the lanes of a rank (default: max_records).

        ``fetch_wait_ms``, when given, is asked for the broker's longest wait each time
        a fetch request is built (see :func:`pipeline.consumer.wait_per_fetch`); otherwise
        the settings' ``fetch_max_wait_ms`` holds.
        """
        super().__init__(
            settings, bootstrap_servers, topics=topics, group_id=group_id, name=name,
            max_records=max_records, fetch_wait_ms=fetch_wait_ms,
        )
        self.on_records = on_records
        self.on_revoked = on_revoked
        # Lower is more urgent; topics not named rank 0.
        self.topic_rank = dict(topic_rank or {})
        self.max_records_by_rank = dict(max_records_by_rank or {})
        self.lag_interval_s = lag_interval_ms / 1000
        self._tracks: dict[TopicPartition, _Track] = {}
        self._paused: set[TopicPartition] = set()
        self.next_offset: dict[TopicPartition, int] = {}
        self.end_offset: dict[TopicPartition, int] = {}
        self._lag_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None

    def _listener(self) -> ConsumerRebalanceListener:
        return _LaneRebalance(self)

    async def start(self) -> None:
        """Join the group, start fetching and measuring lane backlog (idempotent)."""
        if self._task is not None:
            return
        await super().start()
        self._lag_task = asyncio.create_task(self._lag_loop(), name=f"lag:{self.name}")
        self._commit_task = asyncio.create_task(self._commit_loop(), name=f"commit:{self.name}")

    async def stop(self, grace_ms: float | None = None) -> None:
        """Stop fetching, wait for taken records to be answered, commit, leave (idempotent).

        Records not answered within ``grace_ms`` (default the settings'
        ``shutdown_grace_ms``) stay uncommitted for the partitions' next owner.
        """
        task, self._task = self._task, None
        self._stopping = True
        await cancel_and_wait(task)
        for t in (self._lag_task, self._commit_task):
            await cancel_and_wait(t)
        self._lag_task = self._commit_task = None
        if self.consumer is None:
            return
        grace_s = (grace_ms if grace_ms is not None else self.settings.shutdown_grace_ms) / 1000
        if not await self._settled(self._tracks, grace_s):
            log.warning("%s: %d records not answered after %.1fs; leaving them uncommitted",
                        self.name, self.open_records, grace_s)
        await self._leave()

    @property
    def open_records(self) -> int:
        """Records taken and not yet answered."""
        return sum(t.open() for t in self._tracks.values())

    async def _settled(self, tracks: dict[TopicPartition, _Track], grace_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while any(t.open() for t in tracks.values()):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    # -- records ------------------------------------------------------------------

    def done(self, topic: str, partition: int, offset: int) -> None:
        """Record ``offset`` as answered; it may be committed once all before it are."""
        track = self._tracks.get(TopicPartition(topic, partition))
        if track is not None:
            track.done.add(offset)

    async def commit(self) -> None:
        """Commit each partition's watermark that moved since the last commit."""
        if self.consumer is None:
            return
        offsets: dict[TopicPartition, int] = {}
        for tp, track in self._tracks.items():
            mark = track.watermark()
            if mark is None:
                mark = self.next_offset.get(tp)
            if mark is not None and mark > track.committed:
                offsets[tp] = mark
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except CommitFailedError as exc:
            log.warning("%s: commit failed after a rebalance: %s", self.name, exc)
            return
        for tp, mark in offsets.items():
            if tp in self._tracks:
                self._tracks[tp].committed = mark

    async def release(self, revoked: list[TopicPartition]) -> None:
        """Give partitions up: drop their queued records, finish the running ones, commit.

        Runs in aiokafka's rebalance callback. Queued records of the revoked
        partitions are dropped (their next owner reads them again); records
        already in a running batch are waited for, so they are answered and
        committed once rather than answered twice.
        """
        keys = {(tp.topic, tp.partition) for tp in revoked}
        for topic, partition, offset in self.on_revoked(keys):
            track = self._tracks.get(TopicPartition(topic, partition))
            if track is not None:
                track.dropped.add(offset)
        mine = {tp: self._tracks[tp] for tp in revoked if tp in self._tracks}
        await self._settled(mine, self.settings.shutdown_grace_ms / 1000)
        with contextlib.suppress(KafkaError):
            await self.commit()
        for tp in revoked:
            self._tracks.pop(tp, None)
            self.next_offset.pop(tp, None)
            self.end_offset.pop(tp, None)
            self._paused.discard(tp)

    def set_paused(self, wanted: set[TopicPartition]) -> None:
        """Pause exactly the ``wanted`` partitions (of those assigned)."""
        consumer = self.consumer
        if consumer is None or wanted == self._paused:
            return
        assigned = consumer.assignment()
        wanted = {tp for tp in wanted if tp in assigned}
        pause = wanted - self._paused
        resume = self._paused - wanted
        if pause:
            consumer.pause(*pause)
        if resume:
            consumer.resume(*resume)
        self._paused = wanted

    @property
    def paused(self) -> set[TopicPartition]:
        """Partitions paused now."""
        return set(self._paused)

    def assignment(self) -> set[TopicPartition]:
        """Partitions assigned to this member now."""
        return set(self.consumer.assignment()) if self.consumer is not None else set()

    def backlog(self, tp: TopicPartition) -> int:
        """Records of ``tp`` not yet handed over: in Kafka or in the client's fetch buffer.

        The high watermark of the last fetch response counts too: records already
        fetched but queued in the client behind another partition's buffer would
        otherwise go unnoticed until the next end-offset measurement.
        """
        nxt = self.next_offset.get(tp)
        if nxt is None:
            return 0
        end = self.end_offset.get(tp, 0)
        if self.consumer is not None and tp not in self._paused:
            end = max(end, self.consumer.highwater(tp) or 0)
        return max(end - nxt, 0)

    def cap_chunks(self, rank: int, records: int) -> None:
        """Take the lanes of ``rank`` at most ``records`` at a time from now on."""
        self.max_records_by_rank[rank] = records

    async def _poll(self) -> dict[TopicPartition, list[Any]] | None:
        """Fetched records of the most urgent lanes first, else one ordinary poll.

        The Kafka client hands out a partition's fetched chunk (up to
        ``max_partition_fetch_bytes``, thousands of small records) in full before
        the next partition's; taken ``max_records`` at a time, a chunk of a lower
        lane fetched first would hold back every high-priority record behind it.
        """
        consumer = self.consumer
        if consumer is not None and self.topic_rank:
            rank = self.topic_rank
            by_rank: dict[int, list[TopicPartition]] = {}
            for tp in consumer.assignment():
                if tp not in self._paused:
                    by_rank.setdefault(rank.get(tp.topic, 0), []).append(tp)
            cap = self.max_records_by_rank
            if len(by_rank) > 1:
                try:
                    for r in sorted(by_rank):
                        got: dict[TopicPartition, list[Any]] = await consumer.getmany(
                            *by_rank[r], timeout_ms=0, max_records=cap.get(r, self.max_records),
                        )
                        if got:
                            # Taken from the client's buffer, past _poll_up_to: still
                            # activity for idle_aware_wait_ms.
                            self.last_record_s = time.monotonic()
                            return got
                except KafkaError:
                    pass  # the ordinary poll below reports and backs off
            # Nothing fetched is waiting: the next fetch may hold any of the lanes
            # (any of all, before the group assigns them), so take no more of it than
            # the smallest of their caps; the rest is then taken in rank order.
            ranks = list(by_rank) or [0, *cap]
            return await self._poll_up_to(min(cap.get(r, self.max_records) for r in ranks))
        return await super()._poll()

    # -- loops ----------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            batches = await self._poll()
            if not batches:
                # Re-evaluate pausing even when nothing came: a paused lane is
                # resumed only from here.
                self.on_records(())
                continue
            records: list[Any] = []
            for tp, recs in batches.items():
                track = self._tracks.get(tp)
                if track is None:
                    track = self._tracks[tp] = _Track()
                for r in recs:
                    track.offsets.append(r.offset)
                self.next_offset[tp] = recs[-1].offset + 1
                records.extend(recs)
            self.records_handled += len(records)
            self.on_records(records)
            # A poll served from records already fetched returns without suspending:
            # yield, or a long run of intake would keep the executors off the loop.
            await asyncio.sleep(0)

    async def _commit_loop(self) -> None:
        every_s = self.settings.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.commit()
            except KafkaError as exc:
                log.debug("%s: commit failed: %r", self.name, exc)

    async def _lag_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lag_interval_s)
            consumer = self.consumer
            if consumer is None:
                continue
            tps = list(consumer.assignment())
            # A partition being fetched has its end in every fetch response (the high
            # watermark, see backlog): only paused ones need the broker asked, and a
            # ListOffsets request costs the embedded broker about what a fetch does.
            paused = [tp for tp in tps if tp in self._paused]
            try:
                for tp in tps:
                    if tp not in self.next_offset:
                        self.next_offset[tp] = await consumer.position(tp)
                if not paused:
                    continue
                ends = await asyncio.wait_for(consumer.end_offsets(paused), 5.0)
            except (KafkaError, TimeoutError, AssertionError, KeyError) as exc:
                log.debug("%s: end offsets unavailable: %r", self.name, exc)
                continue
            self.end_offset.update(ends)
