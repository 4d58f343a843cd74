"""A consumer-group member that hands records to a handler a batch at a time.

Faust streams pay tens of microseconds of bookkeeping per event (event
objects, per-event acks, sensors, a queue hop between the consumer thread and
the agent); at thousands of requests per second that, not the model, was the
ceiling of a router and a worker. This consumer polls a batch with
``getmany``, awaits the handler for the whole batch, and only then commits
the batch's offsets: at-least-once, with the commit after the handler's
writes are acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from pipeline.settings import Settings
from pipeline.tasks import cancel_and_wait

log = logging.getLogger("inferline.consumer")

Handler = Callable[[Sequence[Any]], Awaitable[None]]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: GroupMember) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        # aiokafka runs this in its coordinator task, possibly while the loop is
        # handling a batch: wait for that batch, then commit it with the rest,
        # or the partitions' next owner would answer it a second time.
        async with self.owner.handling:
            await self.owner.commit()

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.owner.assigned.set()
        parts = sorted((tp.topic, tp.partition) for tp in assigned)
        log.info("%s assigned %s", self.owner.name, parts)


def wait_per_fetch(consumer: AIOKafkaConsumer | None, wait_ms: Callable[[], int],
                   name: str) -> bool:
    """Have ``consumer`` ask ``wait_ms()`` for each fetch request's wait.

    aiokafka fixes the wait at construction, and a value set from outside would
    be stale by the time the next request is built: asked right before, it is
    current. This reaches into the client's fetcher; where that is not as
    expected the fixed wait stays, and False says so (and a test catches it).
    """
    fetcher: Any = getattr(consumer, "_fetcher", None)
    build = getattr(fetcher, "_get_actions_per_node", None)
    if build is None or not isinstance(getattr(fetcher, "_fetch_max_wait_ms", None), int):
        log.warning("%s: this aiokafka's fetcher has no per-request wait to set; "
                    "keeping fetch_max_wait_ms", name)
        return False

    def actions(assignment: Any) -> Any:
        fetcher._fetch_max_wait_ms = wait_ms()
        return build(assignment)

    fetcher._get_actions_per_node = actions
    return True


class GroupMember:
    """A member of ``group_id`` consuming ``topics``: joining, polling, committing, leaving.

    Subclasses say what is done with the records in :meth:`_loop`.
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        *,
        topics: Sequence[str],
        group_id: str,
        name: str = "consumer",
        max_records: int | None = None,
        fetch_wait_ms: Callable[[], int] | None = None,
        idle_backoff: bool = False,
    ) -> None:
        """``fetch_wait_ms``, when given, is asked for the broker's longest wait each time
        a fetch request is built (see :func:`wait_per_fetch`). ``idle_backoff`` asks
        instead for :meth:`idle_aware_wait_ms`: the settings' ``idle_fetch_max_wait_ms``
        once no record has come for ``idle_after_ms``. Otherwise ``fetch_max_wait_ms``
        holds.
        """
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self.topics = list(topics)
        self.group_id = group_id
        self.name = name
        self.max_records = max_records or settings.take_max
        self.assigned = asyncio.Event()
        self.consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._offsets: dict[TopicPartition, int] = {}
        # Held while a batch is handled and its offsets recorded (see _Rebalance).
        self.handling = asyncio.Lock()
        self.records_handled = 0
        self._poll_failures = 0
        if fetch_wait_ms is None and idle_backoff and settings.idle_wait_is_longer:
            fetch_wait_ms = self.idle_aware_wait_ms
        self.fetch_wait_ms = fetch_wait_ms
        self.dynamic_fetch_wait = False
        self.last_record_s = time.monotonic()

    async def start(self) -> None:
        """Join the group and start polling (idempotent)."""
        if self._task is not None:
            return
        s = self.settings
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group_id,
            client_id=f"{self.group_id}-{s.worker_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            rebalance_timeout_ms=s.rebalance_timeout_ms,
            max_poll_records=self.max_records,
            max_poll_interval_ms=max(300_000, s.rebalance_timeout_ms),
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            max_partition_fetch_bytes=max(s.max_request_bytes * 2, 1_048_576),
            **s.kafka_security(),
        )
        try:
            await self.consumer.start()
        except BaseException:
            await quietly(self.consumer.stop())
            self.consumer = None
            raise
        self.consumer.subscribe(self.topics, listener=self._listener())
        self.last_record_s = time.monotonic()
        if self.fetch_wait_ms is not None:
            self.dynamic_fetch_wait = wait_per_fetch(self.consumer, self.fetch_wait_ms, self.name)
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name=f"consume:{self.name}")

    async def stop(self, grace_ms: float | None = None) -> None:
        """Finish the batch in hand, commit, and leave the group (idempotent).

        The batch being handled is given ``grace_ms`` (default: the settings'
        ``shutdown_grace_ms``) to finish, so its answers go out and its offsets are
        committed; past that it is cancelled and left uncommitted, to be consumed
        again by whoever takes the partitions over.
        """
        task, self._task = self._task, None
        self._stopping = True
        if task is not None:
            grace_s = (grace_ms if grace_ms is not None else self.settings.shutdown_grace_ms) / 1000
            try:
                await asyncio.wait_for(asyncio.shield(task), grace_s)
            except TimeoutError:
                log.warning("%s: batch not finished after %.1fs; cancelling it", self.name, grace_s)
                await cancel_and_wait(task)
        await self._leave()

    async def _leave(self) -> None:
        """The end of a stop: the last commit, then leave the group and close the client.

        The last commit gets at most one session timeout: aiokafka retries a commit
        for as long as the broker answers with a retriable error or not at all, and
        past the session timeout the group has let the member go anyway. What stays
        uncommitted is read again by the partitions' next owner (at-least-once).
        """
        if self.consumer is None:
            return
        timeout_s = self.settings.session_timeout_ms / 1000
        try:
            await asyncio.wait_for(self.commit(), timeout_s)
        except KafkaError as exc:
            log.warning("%s: last commit failed (%r); its partitions' next owner reads the "
                        "uncommitted records again", self.name, exc)
        except TimeoutError:
            log.warning("%s: last commit did not finish within %.1fs (the session timeout); "
                        "its partitions' next owner reads the uncommitted records again",
                        self.name, timeout_s)
        await leave_first_generation(self.consumer)
        await self.consumer.stop()
        self.consumer = None

    async def commit(self) -> None:
        """Commit the offsets of every handled batch."""
        if self.consumer is None or not self._offsets:
            return
        offsets, self._offsets = self._offsets, {}
        try:
            await self.consumer.commit(offsets)
        except CommitFailedError as exc:
            # The group rebalanced under us; the new owner re-reads from the last
            # commit, so the worst case is a duplicate answer, never a lost one.
            log.warning("%s: commit failed after a rebalance: %s", self.name, exc)

    def _listener(self) -> ConsumerRebalanceListener:
        return _Rebalance(self)

    def idle_aware_wait_ms(self) -> int:
        """``fetch_max_wait_ms`` while records come, ``idle_fetch_max_wait_ms`` once idle.

        The embedded broker notices records arriving while it holds a fetch only
        every so often (later the longer the wait), so a consumer on the interactive
        path keeps its wait short and polls a hundred times a second even when nothing
        comes, at a few percent of a core in this process and as much in the broker:
        CPU a batch job beside it could use. After ``idle_after_ms`` without a
        record, the fetches wait longer; the first record fetched (or already
        buffered by the client) brings the short wait back for the next request.
        """
        s = self.settings
        fetcher: Any = getattr(self.consumer, "_fetcher", None)
        if getattr(fetcher, "_records", None):
            return s.fetch_max_wait_ms
        if time.monotonic() - self.last_record_s < s.idle_after_ms / 1000:
            return s.fetch_max_wait_ms
        return s.idle_fetch_max_wait_ms

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop fetching these partitions; the group membership (heartbeats) goes on."""
        if self.consumer is not None:
            self.consumer.pause(*partitions)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        """Fetch these partitions again."""
        if self.consumer is not None:
            self.consumer.resume(*partitions)

    async def _poll(self) -> dict[TopicPartition, list[Any]] | None:
        """One ``getmany`` of up to ``max_records``; see :meth:`_poll_up_to`."""
        return await self._poll_up_to(self.max_records)

    async def _poll_up_to(self, max_records: int) -> dict[TopicPartition, list[Any]] | None:
        """One ``getmany``; None after a failure (logged sparingly, with backoff)."""
        consumer = self.consumer
        assert consumer is not None
        try:
            batches: dict[TopicPartition, list[Any]] = await consumer.getmany(
                timeout_ms=100, max_records=max_records
            )
        except KafkaError as exc:
            self._poll_failures += 1
            # One line at the first failure, then one per 64: an outage of
            # minutes must not become megabytes of identical warnings.
            if self._poll_failures == 1 or self._poll_failures % 64 == 0:
                log.warning("%s: poll failed %d time(s): %r; retrying",
                            self.name, self._poll_failures, exc)
            await asyncio.sleep(min(0.1 * self._poll_failures, 2.0))
            return None
        if self._poll_failures:
            log.info("%s: polling again after %d failures", self.name, self._poll_failures)
            self._poll_failures = 0
        if batches:
            self.last_record_s = time.monotonic()
        return batches

    async def _loop(self) -> None:
        """Poll and deal with the records until stopped; started as a task by start()."""
        raise NotImplementedError


class BatchConsumer(GroupMember):
    """Consumes ``topics`` in ``group_id`` and calls ``handler`` with each polled batch."""

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        *,
        topics: Sequence[str],
        group_id: str,
        handler: Handler,
        name: str = "consumer",
        max_records: int | None = None,
        idle_backoff: bool = False,
    ) -> None:
        super().__init__(settings, bootstrap_servers, topics=topics, group_id=group_id,
                         name=name, max_records=max_records, idle_backoff=idle_backoff)
        self.handler = handler

    async def _loop(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        commit_every_s = self.settings.commit_interval_ms / 1000
        loop = asyncio.get_running_loop()
        last_commit = loop.time()
        failures = 0
        while not self._stopping:
            batches = await self._poll()
            if batches:
                records = [r for recs in batches.values() for r in recs]
                try:
                    async with self.handling:
                        await self._handle(records, batches)
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # Nothing of this batch is committed: rewind and try it again, so a
                    # broker hiccup while answering delays records but never drops them.
                    failures += 1
                    backoff_s = min(0.1 * 2**failures, 5.0)
                    log.exception(
                        "%s: handling %d records failed (attempt %d); retrying in %.1fs",
                        self.name, len(records), failures, backoff_s,
                    )
                    for tp, recs in batches.items():
                        consumer.seek(tp, recs[0].offset)
                    await asyncio.sleep(backoff_s)
            if loop.time() - last_commit >= commit_every_s:
                await self.commit()
                last_commit = loop.time()

    async def _handle(self, records: list[Any], batches: dict[TopicPartition, list[Any]]) -> None:
        await self.handler(records)
        self.records_handled += len(records)
        for tp, recs in batches.items():
            self._offsets[tp] = recs[-1].offset + 1


async def quietly(stopping: Any) -> None:
    """Await a client's stop(); errors on the way down only get logged."""
    try:
        await stopping
    except (KafkaError, OSError) as exc:
        log.warning("error while stopping a Kafka client: %r", exc)


async def leave_first_generation(consumer: Any) -> None:
    """Send the LeaveGroup that aiokafka skips for a member of generation 0.

    aiokafka only leaves a group when its generation is > 0 (Kafka starts at 1), but
    the embedded broker numbers the first generation 0. Without this, the next
    member of the group waits out the old member's session timeout. Uses aiokafka
    internals, so any surprise there is only logged; stop() works without it.
    """
    coordinator: Any = getattr(consumer, "_coordinator", None)
    if getattr(coordinator, "generation", None) != 0 or not getattr(coordinator, "member_id", ""):
        return
    try:
        from aiokafka.protocol.group import LeaveGroupRequest

        await coordinator._send_req(LeaveGroupRequest(coordinator.group_id, coordinator.member_id))
    except Exception as exc:
        log.debug("could not leave group generation 0 explicitly: %r", exc)
