"""What every agent of a process shares: settings, registry, metrics and one producer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from pipeline.metrics import Metrics
from pipeline.outbox import Outbox, PartitionCache, new_producer
from pipeline.registry import Registry
from pipeline.settings import Settings

log = logging.getLogger("inferline")

@dataclass
class Runtime:
    """Per-process context handed to the router and the workers."""

    settings: Settings
    bootstrap_servers: str
    registry: Registry
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def worker_id(self) -> str:
        """Name this process signs its responses with."""
        return self.settings.worker_id

    @classmethod
    def build(cls, settings: Settings, bootstrap_servers: str) -> Runtime:
        """Load the registry named by the settings."""
        return cls(
            settings, bootstrap_servers, Registry.load(settings.registry_path),
            Metrics(pool=settings.pool),
        )

    def producer(self) -> AgentProducer:
        """A producer of its own for one agent."""
        return AgentProducer(self.settings, self.bootstrap_servers)


class AgentProducer:
    """One agent's Kafka producer and the outboxes it fills.

    Each agent has its own: with the embedded broker, a metadata request for a
    new topic on a producer with a batch in flight had that batch refused
    (NotLeaderForPartition) until it timed out, so agents must not share one.
    """

    def __init__(self, settings: Settings, bootstrap_servers: str) -> None:
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self._producer: AIOKafkaProducer | None = None
        self._partitions: PartitionCache | None = None

    async def start(self) -> None:
        """Connect (idempotent)."""
        if self._producer is not None:
            return
        producer = new_producer(
            self.settings, self.bootstrap_servers, client_id=f"inferline-{self.settings.worker_id}"
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        self._partitions = PartitionCache(producer)

    async def stop(self) -> None:
        """Flush what is pending and disconnect (idempotent)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    def outbox(self) -> Outbox:
        """A fresh outbox for one handler step (see :mod:`pipeline.outbox`)."""
        assert self._producer is not None and self._partitions is not None, "start() first"
        return Outbox(
            self._producer, self._partitions, dead_letter_topic=self.settings.topic("dlq")
        )
