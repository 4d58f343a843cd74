"""BatchConsumer against the real broker: commit after the handler, replay after a failure."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.broker import EmbeddedBroker
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


async def test_an_idle_consumer_waits_longer_per_fetch_until_a_record_comes(
    settings: Settings, broker: str
) -> None:
    s = settings.model_copy(update={"idle_after_ms": 1500, "idle_fetch_max_wait_ms": 400})
    topic = f"{s.topic_prefix}.idle-{uuid.uuid4().hex[:6]}"
    await ensure_topics(s, broker, [topic], partitions=2)
    seen: list[bytes] = []
    arrived = asyncio.Event()

    async def handler(records: Sequence[Any]) -> None:
        seen.extend(r.value for r in records)
        arrived.set()

    consumer = BatchConsumer(s, broker, topics=[topic], group_id=f"{topic}-group",
                             handler=handler, name="idle-test", idle_backoff=True)
    await consumer.start()
    try:
        assert consumer.dynamic_fetch_wait
        await asyncio.wait_for(consumer.assigned.wait(), 60)
        fetcher: Any = consumer.consumer._fetcher  # type: ignore[union-attr]
        # Quiet past idle_after_ms: the requests built now carry the idle wait.
        await asyncio.sleep(2.0)
        assert consumer.idle_aware_wait_ms() == 400
        assert fetcher._fetch_max_wait_ms == 400
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"r0", key=b"k0")
        finally:
            await producer.stop()
        await asyncio.wait_for(arrived.wait(), 30)
        assert seen == [b"r0"]
        # A record just came: the short wait is back, and the next request has it.
        assert consumer.idle_aware_wait_ms() == s.fetch_max_wait_ms
        await asyncio.sleep(0.5)  # the fetch in flight ends within its 400 ms
        assert fetcher._fetch_max_wait_ms == s.fetch_max_wait_ms
        # And quiet again: back to the idle wait.
        await asyncio.sleep(2.0)
        assert fetcher._fetch_max_wait_ms == 400
    finally:
        await consumer.stop(grace_ms=0)


async def test_without_idle_backoff_or_a_longer_idle_wait_the_fixed_wait_holds(
    settings: Settings, broker: str
) -> None:
    topic = f"{settings.topic_prefix}.fixed-{uuid.uuid4().hex[:6]}"

    async def handler(records: Sequence[Any]) -> None:
        return None

    same = settings.model_copy(update={"idle_fetch_max_wait_ms": settings.fetch_max_wait_ms})
    for s, backoff in ((settings, False), (same, True)):
        consumer = BatchConsumer(s, broker, topics=[topic], group_id=f"{topic}-group",
                                 handler=handler, name="fixed-test", idle_backoff=backoff)
        assert consumer.fetch_wait_ms is None
        await consumer.start()
        try:
            assert not consumer.dynamic_fetch_wait
        finally:
            await consumer.stop(grace_ms=0)


async def test_stop_gives_the_last_commit_one_session_timeout_when_the_broker_hangs(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A broker of its own: this one is frozen (SIGSTOP) while the consumer stops.
    s = settings.model_copy(update={"commit_interval_ms": 600_000, "session_timeout_ms": 2_000,
                                    "heartbeat_interval_ms": 500})
    async with EmbeddedBroker(log_path=tmp_path / "broker.log") as broker:
        topic = f"{s.topic_prefix}.hang-{uuid.uuid4().hex[:6]}"
        await ensure_topics(s, broker.bootstrap_servers, [topic], partitions=1)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"r0", key=b"k0")
        finally:
            await producer.stop()
        handled = asyncio.Event()

        async def handler(records: Sequence[Any]) -> None:
            handled.set()

        consumer = BatchConsumer(s, broker.bootstrap_servers, topics=[topic],
                                 group_id=f"{topic}-group", handler=handler, name="hang-test")
        await consumer.start()
        assert broker.pid is not None
        try:
            await asyncio.wait_for(handled.wait(), 60)
            # Handled and, with a 10-minute commit interval, not yet committed.
            assert consumer._offsets == {TopicPartition(topic, 0): 1}
            os.kill(broker.pid, signal.SIGSTOP)
            stopping = asyncio.create_task(consumer.stop(grace_ms=0))
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            while "last commit did not finish" not in caplog.text:
                assert not stopping.done(), "stop() returned while the commit could not"
                assert loop.time() - t0 < 30, "the last commit was not given up"
                await asyncio.sleep(0.1)
            # Given up after about the session timeout, not before.
            assert loop.time() - t0 >= 1.9
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        # The rest of the stop (leaving the group) goes through once the broker is back.
        await asyncio.wait_for(stopping, 60)
        assert consumer.consumer is None
