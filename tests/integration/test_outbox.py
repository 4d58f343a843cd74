"""Outbox against the real broker: batches per partition, timestamps, unavailable topics."""

from __future__ import annotations

import time
import uuid

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
