"""What every agent of a process shares: settings, registry, metrics and one producer."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from pipeline.metrics import Metrics
from pipeline.outbox import Outbox, PartitionCache
from pipeline.registry import Registry
from pipeline.settings import Settings
from pipeline.topics import crc32_partitioner

log = logging.getLogger("inferline")

@dataclass
class Runtime:
    """Per-process context handed to the router and the workers.

    The producer is shared: one connection pool and one batch per partition for
    every agent of the process. It is started by the first agent that starts
    and stopped (flushed) by the last one that stops.
    """

    settings: Settings
    bootstrap_servers: str
    registry: Registry
    metrics: Metrics = field(default_factory=Metrics)
    producer: AIOKafkaProducer | None = None
    partitions: PartitionCache | None = None
    _users: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def worker_id(self) -> str:
        """Name this process signs its responses with."""
        return self.settings.worker_id

    @classmethod
    def build(cls, settings: Settings, bootstrap_servers: str) -> Runtime:
        """Load the registry named by the settings."""
        return cls(settings, bootstrap_servers, Registry.load(settings.registry_path))

    async def start(self) -> None:
        """Start the shared producer for one more user."""
        async with self._lock:
            self._users += 1
            if self.producer is not None:
                return
            s = self.settings
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap_servers,
                client_id=f"inferline-{s.worker_id}",
                acks="all",
                enable_idempotence=False,
                linger_ms=s.linger_ms,
                max_batch_size=s.producer_batch_bytes,
                max_request_size=max(s.max_request_bytes * 2, 1_048_576),
                partitioner=crc32_partitioner,
                **s.kafka_security(),
            )
            await producer.start()
            self.producer = producer
            self.partitions = PartitionCache(producer)

    async def stop(self) -> None:
        """Release one user; the last one flushes and closes the producer."""
        async with self._lock:
            self._users = max(0, self._users - 1)
            if self._users or self.producer is None:
                return
            producer, self.producer = self.producer, None
            await producer.stop()

    def outbox(self) -> Outbox:
        """A fresh outbox for one handler step (see :mod:`pipeline.outbox`)."""
        assert self.producer is not None and self.partitions is not None, "start() first"
        return Outbox(
            self.producer, self.partitions, dead_letter_topic=self.settings.topic("dlq")
        )
