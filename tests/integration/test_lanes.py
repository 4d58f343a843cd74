"""LaneConsumer against the real broker: the fetch wait asked for as each request is built."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from pipeline.lanes import LaneConsumer
from pipeline.settings import Settings
from pipeline.topics import ensure_topics


async def test_each_fetch_request_asks_for_its_wait(settings: Settings, broker: str) -> None:
    topic = f"{settings.topic_prefix}.lanes-{uuid.uuid4().hex[:6]}"
    await ensure_topics(settings, broker, [topic], partitions=2)
    wait = {"ms": settings.fetch_max_wait_ms}
    asked: list[int] = []
    polling = asyncio.Event()

    def fetch_wait_ms() -> int:
        asked.append(wait["ms"])
        if len(asked) >= 20:
            polling.set()
        return wait["ms"]

    got: list[bytes] = []
    arrived = asyncio.Event()

    def on_records(records: Sequence[Any]) -> None:
        got.extend(r.value for r in records)
        if got:
            arrived.set()

    consumer = LaneConsumer(
        settings, broker, topics=[topic], group_id=f"{topic}-group", on_records=on_records,
        on_revoked=lambda keys: [], name="lanes-test", fetch_wait_ms=fetch_wait_ms,
    )
    # Every step is bounded, so that a stall names its step instead of running into
    # the per-test timeout.
    await asyncio.wait_for(consumer.start(), 60)
    try:
        assert consumer.dynamic_fetch_wait
        await asyncio.wait_for(consumer.assigned.wait(), 60)
        # Polling at the ordinary wait: many requests, each asking.
        await asyncio.wait_for(polling.wait(), 30)
        fetcher: Any = consumer.consumer._fetcher  # type: ignore[union-attr]
        assert fetcher._fetch_max_wait_ms == settings.fetch_max_wait_ms
        # A long wait is what the next requests carry: the broker holds each empty
        # fetch for a second, so in 1.5 s only a handful are built (about 150 at 10 ms).
        wait["ms"] = 1000
        await asyncio.sleep(0.3)
        before = len(asked)
        await asyncio.sleep(1.5)
        assert fetcher._fetch_max_wait_ms == 1000
        assert len(asked) - before < 40, asked[-50:]
        # Records still arrive while the long wait is in force.
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await asyncio.wait_for(producer.start(), 60)
        try:
            await asyncio.wait_for(producer.send_and_wait(topic, b"r0", key=b"k0"), 60)
        finally:
            await asyncio.wait_for(producer.stop(), 60)
        await asyncio.wait_for(arrived.wait(), 30)
        assert got == [b"r0"]
    finally:
        await asyncio.wait_for(consumer.stop(grace_ms=0), 60)


async def test_a_quiet_lane_consumer_waits_longer_until_a_record_comes(
    settings: Settings, broker: str
) -> None:
    s = settings.model_copy(update={"idle_after_ms": 400, "idle_fetch_max_wait_ms": 200})
    topic = f"{s.topic_prefix}.lanes-idle-{uuid.uuid4().hex[:6]}"
    await ensure_topics(s, broker, [topic], partitions=1)
    arrived = asyncio.Event()
    holder: dict[str, LaneConsumer] = {}
    consumer = holder["c"] = LaneConsumer(
        s, broker, topics=[topic], group_id=f"{topic}-group",
        on_records=lambda records: arrived.set() if records else None,
        on_revoked=lambda keys: [], name="lanes-idle-test",
        fetch_wait_ms=lambda: holder["c"].idle_aware_wait_ms(),
    )
    await asyncio.wait_for(consumer.start(), 60)
    try:
        await asyncio.wait_for(consumer.assigned.wait(), 60)
        fetcher: Any = consumer.consumer._fetcher  # type: ignore[union-attr]
        await asyncio.sleep(0.8)
        assert consumer.idle_aware_wait_ms() == 200
        assert fetcher._fetch_max_wait_ms == 200
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await asyncio.wait_for(producer.start(), 60)
        try:
            await asyncio.wait_for(producer.send_and_wait(topic, b"r0", key=b"k0"), 60)
        finally:
            await asyncio.wait_for(producer.stop(), 60)
        await asyncio.wait_for(arrived.wait(), 30)
        # The record handed over counts as activity: the ordinary wait again...
        assert consumer.idle_aware_wait_ms() == s.fetch_max_wait_ms
        await asyncio.sleep(0.3)
        assert fetcher._fetch_max_wait_ms == s.fetch_max_wait_ms
        # ...until the consumer has been quiet for idle_after_ms once more.
        await asyncio.sleep(0.6)
        assert consumer.idle_aware_wait_ms() == 200
    finally:
        await asyncio.wait_for(consumer.stop(grace_ms=0), 60)


async def test_a_fetch_of_every_lane_is_taken_most_urgent_first_in_capped_chunks(
    settings: Settings, broker: str
) -> None:
    tag = uuid.uuid4().hex[:6]
    high = f"{settings.topic_prefix}.lanes-high-{tag}"
    bulk = f"{settings.topic_prefix}.lanes-bulk-{tag}"
    await ensure_topics(settings, broker, [high, bulk], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    try:
        # Both lanes hold records before the consumer's first fetch, which brings both.
        for i in range(30):
            await producer.send(bulk, f"b{i}".encode())
        for i in range(5):
            await producer.send(high, f"h{i}".encode())
        await producer.flush()
    finally:
        await producer.stop()

    chunks: list[list[bytes]] = []
    all_in = asyncio.Event()

    def on_records(records: Sequence[Any]) -> None:
        if records:
            chunks.append([r.value for r in records])
        if sum(len(c) for c in chunks) >= 35:
            all_in.set()

    consumer = LaneConsumer(
        settings, broker, topics=[high, bulk], group_id=f"lanes-rank-{tag}",
        on_records=on_records, on_revoked=lambda keys: [], name="lanes-rank-test",
        max_records=256, topic_rank={high: 0, bulk: 3}, max_records_by_rank={3: 3},
    )
    await consumer.start()
    try:
        await asyncio.wait_for(all_in.wait(), 60)
    finally:
        await consumer.stop(grace_ms=0)
    flat = [v for c in chunks for v in c]
    assert sorted(flat) == sorted([f"b{i}".encode() for i in range(30)] +
                                  [f"h{i}".encode() for i in range(5)])
    # No chunk holding bulk records is over its cap, not even the first (taken before
    # the consumer knew which lanes the fetch held) ...
    assert all(len(c) <= 3 for c in chunks if any(v.startswith(b"b") for v in c)), chunks
    # ... so the urgent lane is through before more than one chunk of bulk.
    last_high = max(i for i, v in enumerate(flat) if v.startswith(b"h"))
    assert sum(v.startswith(b"b") for v in flat[:last_high]) <= 3, chunks


async def test_only_paused_partitions_ends_are_asked_and_both_backlogs_count(
    settings: Settings, broker: str
) -> None:
    topic = f"{settings.topic_prefix}.lanes-lag-{uuid.uuid4().hex[:6]}"
    await ensure_topics(settings, broker, [topic], partitions=2)
    held: list[Any] = []
    consumer = LaneConsumer(
        settings, broker, topics=[topic], group_id=f"{topic}-group",
        # Nothing is answered: what is fetched stays handed over, and what is paused
        # stays in Kafka as backlog.
        on_records=held.extend, on_revoked=lambda keys: [], name="lanes-lag-test",
        lag_interval_ms=50,
    )
    asked: list[set[TopicPartition]] = []
    await asyncio.wait_for(consumer.start(), 60)
    try:
        await asyncio.wait_for(consumer.assigned.wait(), 60)
        kafka: Any = consumer.consumer
        end_offsets = kafka.end_offsets

        async def recording(tps: Any) -> Any:
            asked.append(set(tps))
            return await end_offsets(tps)

        kafka.end_offsets = recording
        p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        await asyncio.sleep(0.5)
        # Nothing paused: every end comes with the fetch responses.
        assert asked == []
        consumer.set_paused({p1})
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await asyncio.wait_for(producer.start(), 60)
        try:
            for i in range(3):
                await asyncio.wait_for(
                    producer.send_and_wait(topic, b"a%d" % i, partition=0), 60)
            for i in range(5):
                await asyncio.wait_for(
                    producer.send_and_wait(topic, b"b%d" % i, partition=1), 60)
        finally:
            await asyncio.wait_for(producer.stop(), 60)

        # The backlog is read from the consumer's state: nothing signals its change.
        async def settled() -> None:
            while not (len(held) == 3 and consumer.backlog(p1) == 5):  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        await asyncio.wait_for(settled(), 30)
        assert {r.value for r in held} == {b"a0", b"a1", b"a2"}
        # The paused partition's end was asked of the broker, and only its end.
        assert asked and all(tps == {p1} for tps in asked), asked
        assert consumer.end_offset.get(p0) is None
        # Handed over, the fetched partition has no backlog; resumed, the paused one's
        # records come and it has none either.
        assert consumer.backlog(p0) == 0
        consumer.set_paused(set())

        async def drained() -> None:
            while len(held) < 8:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        await asyncio.wait_for(drained(), 30)
        assert consumer.backlog(p1) == 0
    finally:
        await asyncio.wait_for(consumer.stop(grace_ms=0), 60)
