"""``inferline status``'s topic reads against the real embedded broker."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from agents.cli_status import _read_since
from pipeline.settings import Settings
from pipeline.topics import ensure_topics

pytestmark = pytest.mark.broker

T0_MS = 1_800_000_000_000


async def _produce_batches(broker: str, topic: str) -> None:
    """Three record batches of 1, 10 and 100 records, the third stamped T0+2000+i ms."""
    producer = AIOKafkaProducer(bootstrap_servers=broker, linger_ms=50)
    await producer.start()
    try:
        for size, base_ms in ((1, T0_MS), (10, T0_MS + 1_000), (100, T0_MS + 2_000)):
            batch = producer.create_batch()
            for i in range(size):
                assert batch.append(key=None, value=str(i).encode(),
                                    timestamp=base_ms + i) is not None
            batch.close()
            await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()


async def test_read_since_reads_past_the_listed_end_of_the_last_batch(
    broker: str, settings: Settings
) -> None:
    topic = f"{settings.topic_prefix}.status-read-{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, broker, [topic], partitions=1)
    await _produce_batches(broker, topic)
    reader = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await reader.start()
    try:
        tp = TopicPartition(topic, 0)
        reader._client.add_topic(topic)
        await reader._client.force_metadata_update()
        listed = (await reader.end_offsets([tp]))[tp]
        # The broker's gap this read must survive: its listed end stops one past the
        # first record of the last batch (12), not past the last record (111). With a
        # broker that lists the true end, the reads below must hold all the same.
        assert listed in (12, 111)
        everything = await _read_since(reader, topic, T0_MS)
        assert [r.offset for r in everything] == list(range(111))
        # From the middle of the last batch: past the listed end on that broker.
        tail = await _read_since(reader, topic, T0_MS + 2_050)
        assert [r.offset for r in tail] == list(range(61, 111))
        assert [int(r.value) for r in tail] == list(range(50, 100))
        assert await asyncio.wait_for(_read_since(reader, topic, T0_MS + 10_000), 30) == []
    finally:
        await reader.stop()
