"""Topic names, topic creation and the record partitioner shared by every producer.

Topics are created explicitly with the configured partition count: a Kafka-protocol
broker that auto-creates topics on first produce (the embedded one does) would give
them a single partition, which caps the consumer group at one worker per topic.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from pipeline.errors import BrokerError
from pipeline.settings import Settings

log = logging.getLogger(__name__)

FIXED_TOPICS: tuple[str, ...] = (
    "requests", "responses", "dlq", "metrics", "control", "telemetry",
)
PRIORITIES: tuple[str, ...] = ("high", "normal", "batch")

_CONNECT_ATTEMPTS = 5
_FIRST_BACKOFF_MS = 100.0
_ADMIN_REQUEST_TIMEOUT_MS = 10_000
_COMPACT = {"cleanup.policy": "compact"}
_END_PROBE_POLL_MS = 100


def fixed_topics(settings: Settings) -> list[str]:
    """Full names of the fixed topics: requests, responses, dlq, metrics, control, telemetry."""
    return [settings.topic(name) for name in FIXED_TOPICS]


def lane_topics(
    settings: Settings, models: Iterable[str], priorities: Sequence[str] = PRIORITIES
) -> list[str]:
    """Full names of the lane topics of every model at every priority, model-major."""
    return [settings.lane_topic(model, priority) for model in models for priority in priorities]


def crc32_partitioner(
    key_bytes: bytes | None, all_partitions: Sequence[int], available_partitions: Sequence[int]
) -> int:
    """Pick the partition of a record: CRC-32 of its key modulo the partition count.

    aiokafka's default partitioner hashes keys with a pure-Python murmur2 that costs
    about 10 µs per record, which shows up in producer profiles at our rates; zlib's
    CRC-32 runs in C. It is stable across processes and restarts (unlike ``hash()``),
    so a request id always lands on the same partition, and it matches librdkafka's
    default ``consistent_random`` partitioner, so confluent-kafka producers agree with
    ours. Records without a key go to a random available partition.
    """
    if key_bytes is None:
        return random.choice(available_partitions or all_partitions)
    return all_partitions[zlib.crc32(key_bytes) % len(all_partitions)]


async def ensure_topics(
    settings: Settings,
    bootstrap: str,
    names: Iterable[str],
    *,
    partitions: int | None = None,
    replication_factor: int = 1,
    compacted: Iterable[str] = (),
) -> None:
    """Create whichever of ``names`` do not exist yet; existing topics are left as they are.

    Topics listed in ``compacted`` get ``cleanup.policy=compact``; a broker that refuses
    that config gets the topic without it and a warning. The broker may still be coming
    up, so connecting is retried a few times with backoff before :class:`BrokerError`.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    compact = set(compacted)
    count = settings.partitions if partitions is None else partitions
    admin = await _connect_admin(settings, bootstrap)
    try:
        topics = [
            NewTopic(
                name, count, replication_factor, topic_configs=_COMPACT if name in compact else {}
            )
            for name in wanted
        ]
        failed = await _create(admin, topics)
        retry = [t for t in topics if t.name in failed and t.topic_configs]
        for topic in retry:
            log.warning(
                "broker %s refused configs %s for topic %r (%s); creating it without them",
                bootstrap, topic.topic_configs, topic.name, failed.pop(topic.name),
            )
        if retry:
            plain = [NewTopic(t.name, count, replication_factor) for t in retry]
            failed.update(await _create(admin, plain))
        if failed:
            detail = "; ".join(f"{name}: {err}" for name, err in sorted(failed.items()))
            raise BrokerError(f"could not create topics on {bootstrap}: {detail}")
    except KafkaError as exc:
        raise BrokerError(f"could not create topics on {bootstrap}: {exc!r}") from exc
    finally:
        await admin.close()


async def _connect_admin(settings: Settings, bootstrap: str) -> Any:
    backoff_ms = _FIRST_BACKOFF_MS
    last: BaseException | None = None
    for attempt in range(1, _CONNECT_ATTEMPTS + 1):
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=_ADMIN_REQUEST_TIMEOUT_MS,
            **settings.kafka_security(),
        )
        try:
            await admin.start()
            return admin
        except (KafkaError, OSError) as exc:
            last = exc
            await admin.close()
            if attempt < _CONNECT_ATTEMPTS:
                log.debug("broker %s not reachable yet (%r); retrying", bootstrap, exc)
                await asyncio.sleep(backoff_ms / 1000)
                backoff_ms *= 2
    raise BrokerError(
        f"cannot reach the Kafka broker at {bootstrap} after {_CONNECT_ATTEMPTS} attempts: "
        f"{last!r}",
        bootstrap=bootstrap,
    )


async def _create(admin: Any, topics: list[NewTopic]) -> dict[str, str]:
    """Send one CreateTopics request; return the topics that failed, with their error."""
    response = await admin.create_topics(topics)
    failed: dict[str, str] = {}
    # CreateTopics reports per-topic error codes instead of raising.
    for entry in response.topic_errors:
        name, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        if code == 0 or code == TopicAlreadyExistsError.errno:
            continue
        failed[name] = f"{for_code(code).__name__}: {message or 'no message'}"
    return failed


async def exact_end_offsets(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], *, timeout_ms: float = 5_000,
    beginning: Mapping[TopicPartition, int] | None = None,
) -> dict[TopicPartition, int]:
    """End offsets of ``tps`` (assigned to ``consumer``), exact on the embedded broker too.

    The embedded broker lists a partition's end as one past the first record of the
    partition's last record batch, so a backlog inside that batch would read as none;
    a fetch response's high watermark is exact. Each partition with records is
    fetched once from its last listed record and the larger end is taken. A partition
    whose probe brings nothing within ``timeout_ms`` keeps its listed end (a lower
    bound). Moves the consumer's positions on ``tps``: seek afterwards as needed.
    ``beginning``: the partitions' first offsets, where the caller has them already.
    """
    if not tps:
        return {}
    listed: dict[TopicPartition, int] = await consumer.end_offsets(list(tps))
    first = beginning if beginning is not None else await consumer.beginning_offsets(list(tps))
    exact = dict(listed)
    todo = {tp for tp in tps if listed[tp] > first[tp]}
    for tp in todo:
        consumer.seek(tp, listed[tp] - 1)
    deadline = time.monotonic() + timeout_ms / 1000
    while todo and time.monotonic() < deadline:
        fetched = await consumer.getmany(*todo, timeout_ms=_END_PROBE_POLL_MS)
        for tp in fetched:
            # Fresh: this fetch response carried the partition's records.
            exact[tp] = max(listed[tp], consumer.highwater(tp) or 0)
            todo.discard(tp)
    if todo:
        log.debug("end offsets of %s left as listed: no probe answer", sorted(todo))
    return exact
