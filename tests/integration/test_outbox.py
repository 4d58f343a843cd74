"""Outbox against the real broker: batches per partition, timestamps, unavailable topics."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer

from pipeline.outbox import Outbox, PartitionCache, TopicUnavailable
from pipeline.settings import Settings
from pipeline.topics import crc32_partitioner, ensure_topics
from tests.integration.conftest import read_topic


async def test_records_keep_keys_timestamps_headers_and_partitions(
    settings: Settings, broker: str
) -> None:
    topic = f"{settings.topic_prefix}.outbox-{uuid.uuid4().hex[:6]}"
    await ensure_topics(settings, broker, [topic], partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=broker, max_batch_size=16_384)
    await producer.start()
    try:
        outbox = Outbox(producer, PartitionCache(producer))
        stamp = int(time.time() * 1000) - 60_000
        # Enough bytes to need several batches of 16 KiB per partition.
        for i in range(300):
            outbox.add(topic, f"k{i}".encode(), b"v" * 200 + str(i).encode(),
                       timestamp_ms=stamp + i, headers=[("h", str(i).encode())])
        assert len(outbox) == 300
        await outbox.flush()
        assert len(outbox) == 0
    finally:
        await producer.stop()
    records = await read_topic(broker, topic, idle_ms=300)
    assert len(records) == 300
    for r in records:
        i = int(r.key[1:])
        assert r.value.endswith(str(i).encode())
        assert r.timestamp == stamp + i
        assert dict(r.headers)["h"] == str(i).encode()
        # The same placement the producer's partitioner gives the key.
        assert r.partition == crc32_partitioner(r.key, [0, 1, 2], [0, 1, 2])


async def test_unavailable_topic_is_diverted_to_the_dead_letter_topic(
    settings: Settings, broker: str
) -> None:
    dlq = f"{settings.topic_prefix}.outbox-dlq-{uuid.uuid4().hex[:6]}"
    good = f"{settings.topic_prefix}.outbox-ok-{uuid.uuid4().hex[:6]}"
    missing = f"{settings.topic_prefix}.outbox-missing-{uuid.uuid4().hex[:6]}"
    await ensure_topics(settings, broker, [dlq, good], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    try:
        cache = PartitionCache(producer)
        await cache.get(dlq)
        await cache.get(good)
        # No metadata can arrive in zero seconds: the broker stands in for one that
        # does not auto-create topics and does not know this one.
        cache.metadata_timeout_s = 0.0
        outbox = Outbox(producer, cache, dead_letter_topic=dlq)
        outbox.add(missing, b"lost-reply", b"response bytes")
        outbox.add(good, b"fine", b"other response")
        await outbox.flush()
        # Remembered as unavailable: the next flush does not wait again.
        try:
            await cache.get(missing)
            raise AssertionError("expected TopicUnavailable")
        except TopicUnavailable as exc:
            assert missing in str(exc)
    finally:
        await producer.stop()
    assert [r.value for r in await read_topic(broker, good, idle_ms=300)] == [b"other response"]
    diverted = await read_topic(broker, dlq, idle_ms=300)
    assert [(r.key, r.value) for r in diverted] == [(b"lost-reply", b"response bytes")]
    headers = dict(diverted[0].headers)
    assert headers["inferline-error-code"] == b"UNDELIVERABLE"
    assert headers["inferline-source-topic"] == missing.encode()
    assert missing.encode() in headers["inferline-error-message"]


async def test_concurrent_flushes_share_one_batch_per_partition(
    settings: Settings, broker: str
) -> None:
    topic = f"{settings.topic_prefix}.outbox-co-{uuid.uuid4().hex[:6]}"
    await ensure_topics(settings, broker, [topic], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    sent_batches = 0
    real_send_batch = producer.send_batch

    async def counting_send_batch(*args: Any, **kwargs: Any) -> Any:
        nonlocal sent_batches
        sent_batches += 1
        return await real_send_batch(*args, **kwargs)

    producer.send_batch = counting_send_batch  # type: ignore[method-assign]
    try:
        cache = PartitionCache(producer)
        await cache.get(topic)
        outboxes = []
        for n in range(40):
            outbox = Outbox(producer, cache)
            for i in range(5):
                outbox.add(topic, f"k{n}-{i}".encode(), f"v{n}-{i}".encode())
            outboxes.append(outbox)
        # Each flush returns only once its own records are acknowledged.
        await asyncio.gather(*(o.flush() for o in outboxes))
        assert all(len(o) == 0 for o in outboxes)
    finally:
        await producer.stop()
    records = await read_topic(broker, topic, idle_ms=300)
    assert sorted(r.value for r in records) == sorted(
        f"v{n}-{i}".encode() for n in range(40) for i in range(5)
    )
    # Forty flushes racing for one partition: merged, not one round trip each.
    assert sent_batches <= 3, sent_batches
