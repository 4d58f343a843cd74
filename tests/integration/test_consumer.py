"""BatchConsumer against the real broker: commit after the handler, replay after a failure."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.consumer import BatchConsumer
from pipeline.settings import Settings
from pipeline.topics import ensure_topics


async def test_failed_batch_is_replayed_and_committed_once_handled(
    settings: Settings, broker: str
) -> None:
    topic = f"{settings.topic_prefix}.consumer-{uuid.uuid4().hex[:6]}"
    group = f"{topic}-group"
    await ensure_topics(settings, broker, [topic], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    try:
        for i in range(20):
            await producer.send_and_wait(topic, f"r{i}".encode(), key=f"k{i}".encode())
    finally:
        await producer.stop()

    seen: list[bytes] = []
    failed = asyncio.Event()
    done = asyncio.Event()

    async def handler(records: Sequence[Any]) -> None:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("broker hiccup while answering")
        seen.extend(r.value for r in records)
        if len(set(seen)) >= 20:
            done.set()

    consumer = BatchConsumer(settings, broker, topics=[topic], group_id=group, handler=handler,
                             name="replay-test")
    await consumer.start()
    try:
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await consumer.stop()
    # The failed batch came back: every record was handled after the failure.
    assert sorted(set(seen)) == sorted(f"r{i}".encode() for i in range(20))

    check = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
    await check.start()
    try:
        assert await check.committed(TopicPartition(topic, 0)) == 20
    finally:
        await check.stop()
