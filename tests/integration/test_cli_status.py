"""``inferline status``'s topic reads against the real embedded broker."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.cli_status import _read_since
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.integration.conftest import T0_MS, produce_batches

pytestmark = pytest.mark.broker


async def test_read_since_reads_past_the_listed_end_of_the_last_batch(
    broker: str, settings: Settings
) -> None:
    topic = f"{settings.topic_prefix}.status-read-{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, broker, [topic], partitions=1)
    await produce_batches(broker, topic)
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
