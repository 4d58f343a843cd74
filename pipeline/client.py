"""Clients for the services around the pipeline: send requests, get responses back.

:class:`InferenceClient` is request/response over Kafka: it owns a private reply
topic, consumes it without a consumer group (no rebalance wait) and resolves one
future per request id. :class:`ResponseConsumer` is for downstream services that
read a shared response topic in a consumer group.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from pipeline.codec import encode_list
from pipeline.consumer import quietly, wait_per_fetch
from pipeline.errors import BrokerError, ClientTimeout, InvalidRequest
from pipeline.outbox import PartitionCache, TopicUnavailable
from pipeline.response_consumer import ReceivedResponse, ResponseConsumer, ResponseParser
from pipeline.settings import Settings
from pipeline.tasks import Lifecycle, cancel_and_wait
from pipeline.topics import crc32_partitioner, ensure_topics
from schemas.messages import InferenceRequest, InferenceResponse, Priority, Tensor

log = logging.getLogger(__name__)

__all__ = ["InferenceClient", "ReceivedResponse", "ResponseConsumer"]

Headers = list[tuple[str, bytes]]
# key, value, headers, the response's future
_Queued = tuple[bytes, bytes, "Headers | None", "asyncio.Future[InferenceResponse]"]
_FLUSH_AT = 256
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_POLL_MS = 500
_ERROR_BACKOFF_MS = 200
# Ids answered recently, to tell a redelivered duplicate from a stranger's response.
_RESOLVED_MEMORY = 100_000


class InferenceClient(Lifecycle):
    """Send InferenceRequests and await their InferenceResponses.

    Responses come back on the client's own reply topic, which it creates, assigns
    (all partitions, no consumer group) and reads from the beginning. Delivery is
    at-least-once: a redelivered response for an answered id lands in
    :attr:`duplicates`, one for an id nobody waits for (or that timed out) in
    :attr:`unmatched`. A response with ``status`` other than ``ok`` is returned,
    not raised: the status is part of the answer. Give each client a reply topic of
    its own: it is read from the beginning, and other clients' responses on a
    shared one would only count as unmatched.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        bootstrap_servers: str,
        reply_topic: str | None = None,
        client_id: str | None = None,
        max_in_flight: int = 10_000,
        requests_topic: str | None = None,
        fetch_max_wait_ms: int | None = None,
        bulk_fetch_wait_ms: int | None = None,
    ) -> None:
        """``fetch_max_wait_ms`` fixes the reply fetches' wait. ``bulk_fetch_wait_ms``
        is for clients that need no low latency while they keep submitting (batch
        jobs): see :meth:`reply_wait_ms`. Without either the wait adapts to the
        age of the youngest waiting request.
        """
        self.settings = settings
        # Against a broker that answers fetches by polling (the embedded one), each
        # reader costs it a storage scan every wait: clients that need no low latency
        # (batch jobs) read less often.
        self.fetch_max_wait_ms = fetch_max_wait_ms or settings.fetch_max_wait_ms
        self.bulk_fetch_wait_ms = bulk_fetch_wait_ms
        # Without a fixed wait, each reply fetch asks reply_wait_ms() (see there).
        if bulk_fetch_wait_ms is not None:
            self._adaptive_wait = bulk_fetch_wait_ms > self.fetch_max_wait_ms
        else:
            self._adaptive_wait = (fetch_max_wait_ms is None and settings.reply_wait_share > 0
                                   and settings.idle_wait_is_longer)
        self.dynamic_fetch_wait = False
        self._last_submit_s = time.monotonic()
        # Bulk jobs write straight to a model's batch lane: behind the router's one
        # FIFO they would hold up interactive requests before any priority applies.
        self.requests_topic = requests_topic or settings.topic("requests")
        self.bootstrap_servers = bootstrap_servers
        self.client_id = client_id or uuid.uuid4().hex[:12]
        self._reply_topic = reply_topic or f"{settings.topic_prefix}.responses.{self.client_id}"
        if not _TOPIC_RE.match(self._reply_topic):
            raise ValueError(f"reply topic {self._reply_topic!r} is not a valid Kafka topic name")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._queued: list[_Queued] = []
        self._flusher: asyncio.Task[None] | None = None
        self._partitions: PartitionCache | None = None
        self._pending: dict[str, asyncio.Future[InferenceResponse]] = {}
        self._resolved: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._producer: Any = None
        self._consumer: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._invalid = ResponseParser(f"client {self.client_id}")
        self.submitted = 0
        self.received = 0
        self.duplicates = 0
        self.unmatched = 0
        self.delivery_errors = 0

    @property
    def reply_topic(self) -> str:
        """The topic this client's responses arrive on."""
        return self._reply_topic

    @property
    def invalid(self) -> int:
        """Records on the reply topic that were not valid InferenceResponses."""
        return self._invalid.count

    @property
    def in_flight(self) -> int:
        """Requests (and expect() waiters) still waiting for their response."""
        return len(self._pending)

    def stats(self) -> dict[str, int]:
        """All counters at once, for logs and metrics."""
        return {
            "submitted": self.submitted, "received": self.received, "in_flight": self.in_flight,
            "duplicates": self.duplicates, "unmatched": self.unmatched, "invalid": self.invalid,
            "delivery_errors": self.delivery_errors,
        }

    async def start(self) -> None:
        """Create the reply topic, connect, and assign it; idempotent.

        When this returns the reply partitions are assigned and positioned, so no
        response to a request sent afterwards can be missed.
        """
        async with self._lock:
            if self._producer is not None:
                return
            s = self.settings
            # The requests topic too: a broker that auto-creates it on first produce
            # would give it a single partition.
            await ensure_topics(
                s, self.bootstrap_servers, [s.topic("requests"), self._reply_topic],
                partitions=s.partitions,
            )
            security = s.kafka_security()
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap_servers, client_id=f"inferline-{self.client_id}",
                acks="all", enable_idempotence=False, linger_ms=s.linger_ms,
                max_batch_size=s.producer_batch_bytes, partitioner=crc32_partitioner,
                max_request_size=s.max_request_bytes, **security,
            )
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap_servers, client_id=f"inferline-{self.client_id}",
                group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                fetch_max_wait_ms=self.fetch_max_wait_ms, **security,
            )
            try:
                await producer.start()
                await consumer.start()
                partitions = sorted(await producer.partitions_for(self._reply_topic))
                tps = [TopicPartition(self._reply_topic, p) for p in partitions]
                consumer.assign(tps)
                if self._adaptive_wait:
                    self.dynamic_fetch_wait = wait_per_fetch(
                        consumer, self.reply_wait_ms, f"client {self.client_id}"
                    )
                if not await consumer.seek_to_beginning(*tps):
                    raise BrokerError(f"cannot position on reply topic {self._reply_topic!r}")
            except BaseException as exc:
                await quietly(producer.stop())
                await quietly(consumer.stop())
                if isinstance(exc, KafkaError):
                    raise BrokerError(
                        f"cannot connect the inference client to {self.bootstrap_servers}: {exc!r}"
                    ) from exc
                raise
            self._producer, self._consumer = producer, consumer
            self._partitions = PartitionCache(producer)
            self._reader = asyncio.create_task(
                self._read(consumer), name=f"inferline-reply-{self.client_id}"
            )

    async def stop(self) -> None:
        """Flush and disconnect; requests still waiting fail with BrokerError. Idempotent."""
        async with self._lock:
            producer, consumer, reader = self._producer, self._consumer, self._reader
            self._producer = self._consumer = self._reader = None
            if producer is None:
                return
            flusher, self._flusher = self._flusher, None
            if flusher is not None:
                with contextlib.suppress(Exception):
                    await flusher
            await quietly(producer.stop())
            await cancel_and_wait(reader)
            await quietly(consumer.stop())
            for request_id, fut in list(self._pending.items()):
                if not fut.done():
                    fut.set_exception(BrokerError(
                        f"client {self.client_id} stopped before the response to "
                        f"{request_id!r} arrived", request_id=request_id,
                    ))
            self._pending.clear()

    def expect(self, id: str) -> asyncio.Future[InferenceResponse]:
        """Register a waiter for the response to ``id``, before sending it by other means."""
        return self._register(id, holds_slot=False)

    def _register(self, id: str, *, holds_slot: bool) -> asyncio.Future[InferenceResponse]:
        if id in self._pending:
            raise InvalidRequest(f"request id {id!r} is already waiting for a response", id=id)
        fut: asyncio.Future[InferenceResponse] = asyncio.get_running_loop().create_future()
        self._pending[id] = fut
        self._last_submit_s = time.monotonic()
        # One callback does both chores: each extra one costs a loop turn per request.
        fut.add_done_callback(functools.partial(self._settled, id, holds_slot))
        return fut

    def _settled(self, id: str, holds_slot: bool, fut: asyncio.Future[InferenceResponse]) -> None:
        if self._pending.get(id) is fut:
            del self._pending[id]
        if holds_slot:
            self._slots.release()

    def _drop(self, id: str, fut: asyncio.Future[InferenceResponse]) -> None:
        """Stop waiting for ``id`` now; a late response then counts as unmatched."""
        fut.cancel()
        if self._pending.get(id) is fut:
            del self._pending[id]

    async def submit(
        self, request: InferenceRequest | Mapping[str, Any], *, headers: Headers | None = None
    ) -> asyncio.Future[InferenceResponse]:
        """Queue one request for production and return the future of its response.

        The request's ``reply_to`` defaults to this client's reply topic. Mappings are
        sent as given (so tests can send requests the pipeline must reject), apart
        from that default. Waits only for an in-flight slot, not for delivery: requests
        submitted in the same loop turn go out together, one record batch per
        partition, and a failed delivery fails their futures with BrokerError.
        """
        if self._producer is None:
            raise BrokerError("the inference client is not started; call start() first")
        request_id, value = self._serialize(request)
        if len(value) > self.settings.max_request_bytes:
            raise InvalidRequest(
                f"request {request_id!r} is {len(value)} bytes, over "
                f"max_request_bytes={self.settings.max_request_bytes}", id=request_id,
            )
        await self._slots.acquire()
        try:
            fut = self._register(request_id, holds_slot=True)
        except BaseException:
            self._slots.release()
            raise
        self._queued.append((request_id.encode(), value, headers, fut))
        self.submitted += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="inferline-client-flush")
        if len(self._queued) >= _FLUSH_AT:
            # A caller submitting in a tight loop never yields otherwise: let the
            # flusher ship what is queued, so the pipeline starts working now.
            await asyncio.sleep(0)
        return fut

    async def _flush(self) -> None:
        producer, partitions = self._producer, self._partitions
        assert producer is not None and partitions is not None
        topic = self.requests_topic
        # One turn of the loop lets a burst of submit() calls gather into one batch.
        if len(self._queued) < _FLUSH_AT:
            await asyncio.sleep(0)
        while self._queued:
            queued, self._queued = self._queued, []
            try:
                parts = await partitions.get(topic)
                by_part: dict[int, list[_Queued]] = {}
                for item in queued:
                    by_part.setdefault(crc32_partitioner(item[0], parts, parts), []).append(item)
                for partition, items in by_part.items():
                    await self._send_partition(producer, topic, partition, items)
            except (KafkaError, TopicUnavailable) as exc:
                self._fail(queued, BrokerError(f"cannot send requests to {topic!r}: {exc!r}"))

    async def _send_partition(
        self, producer: Any, topic: str, partition: int, items: list[_Queued]
    ) -> None:
        now_ms = int(time.time() * 1000)
        batch = producer.create_batch()
        members: list[_Queued] = []
        for item in items:
            key, value, headers, _ = item
            if batch.append(timestamp=now_ms, key=key, value=value,
                            headers=list(headers or ())) is None:
                self._watch(await producer.send_batch(batch, topic, partition=partition), members)
                batch, members = producer.create_batch(), []
                batch.append(timestamp=now_ms, key=key, value=value, headers=list(headers or ()))
            members.append(item)
        if members:
            self._watch(await producer.send_batch(batch, topic, partition=partition), members)

    def _watch(self, delivery: asyncio.Future[Any], members: list[_Queued]) -> None:
        def delivered(d: asyncio.Future[Any]) -> None:
            error = BrokerError("delivery cancelled") if d.cancelled() else d.exception()
            if error is not None:
                self._fail(members, error if isinstance(error, BrokerError) else BrokerError(
                    f"requests were not delivered: {error!r}"))

        delivery.add_done_callback(delivered)

    def _fail(self, items: list[_Queued], error: BrokerError) -> None:
        self.delivery_errors += len(items)
        for *_, fut in items:
            if not fut.done():
                fut.set_exception(error)

    def _serialize(self, request: InferenceRequest | Mapping[str, Any]) -> tuple[str, bytes]:
        if isinstance(request, InferenceRequest):
            if request.reply_to is None:
                request = request.model_copy(update={"reply_to": self._reply_topic})
            payload: dict[str, Any] = request.model_dump(exclude_none=True)
            request_id = request.id
        else:
            payload = dict(request)
            if payload.get("reply_to") is None:
                payload["reply_to"] = self._reply_topic
            raw_id = payload.get("id")
            if not isinstance(raw_id, str) or not raw_id:
                raise InvalidRequest("a request needs a non-empty string 'id' to be awaited")
            request_id = raw_id
        return request_id, orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]] | Sequence[Tensor | Mapping[str, Any]],
        *,
        id: str | None = None,
        version: str | None = None,
        priority: Priority = "normal",
        timeout_ms: int | None = None,
        parameters: Mapping[str, Any] | None = None,
        headers: Headers | None = None,
        wait_timeout_ms: float = 30_000,
    ) -> InferenceResponse:
        """Run one inference and return its response; ClientTimeout if none comes in time.

        ``inputs`` is either ``{name: array}`` or a sequence of OIP tensors.
        """
        if isinstance(inputs, Mapping):
            tensors: list[Any] = [encode_list(n, np.asarray(a)) for n, a in inputs.items()]
        else:
            tensors = list(inputs)
        try:
            request = InferenceRequest(
                id=id or uuid.uuid4().hex, model=model, version=version, priority=priority,
                timeout_ms=timeout_ms, inputs=tensors,
                parameters=dict(parameters) if parameters is not None else None,
            )
        except ValidationError as exc:
            raise InvalidRequest(f"not a valid inference request: {exc}") from exc
        fut = await self.submit(request, headers=headers)
        try:
            return await asyncio.wait_for(fut, wait_timeout_ms / 1000)
        except TimeoutError:
            self._drop(request.id, fut)
            raise ClientTimeout(request.id, wait_timeout_ms) from None

    async def wait_until_served(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        *,
        timeout_ms: float = 120_000,
        probe_ms: float = 2_000,
    ) -> InferenceResponse:
        """Probe ``model`` with ``inputs`` until one answer is ok; returns that answer.

        For start-up: a pipeline whose groups are still forming answers nothing, so
        each probe waits ``probe_ms``; ClientTimeout once ``timeout_ms`` has passed.
        """
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            try:
                resp = await self.infer(model, inputs, wait_timeout_ms=probe_ms)
                if resp.status == "ok":
                    return resp
            except ClientTimeout:
                pass
            if time.monotonic() > deadline:
                raise ClientTimeout(f"readiness probe of {model}", timeout_ms)

    async def infer_many(
        self,
        requests: Iterable[InferenceRequest | Mapping[str, Any]],
        *,
        wait_timeout_ms: float = 30_000,
    ) -> list[InferenceResponse]:
        """Submit a burst of requests, then await all their responses, in request order.

        ``wait_timeout_ms`` counts from the last submission; when it runs out the rest
        are dropped and ClientTimeout names the first missing id.
        """
        futures: list[tuple[str, asyncio.Future[InferenceResponse]]] = []
        try:
            for request in requests:
                futures.append((_request_id(request), await self.submit(request)))
            if futures:
                await asyncio.wait(
                    [f for _, f in futures], timeout=wait_timeout_ms / 1000,
                    return_when=asyncio.FIRST_EXCEPTION,
                )
            error = next((f.exception() for _, f in futures if f.done() and f.exception()), None)
            if error is not None:
                raise error
            for request_id, fut in futures:
                if not fut.done():
                    raise ClientTimeout(request_id, wait_timeout_ms)
            return [fut.result() for _, fut in futures]
        finally:
            for request_id, fut in futures:
                self._drop(request_id, fut)

    async def send_raw(
        self, value: bytes, *, key: bytes | None = None, headers: Headers | None = None,
        topic: str | None = None,
    ) -> None:
        """Produce arbitrary bytes (to the requests topic by default) and await delivery."""
        if self._producer is None:
            raise BrokerError("the inference client is not started; call start() first")
        try:
            await self._producer.send_and_wait(
                topic or self.settings.topic("requests"), value, key=key, headers=headers
            )
        except KafkaError as exc:
            raise BrokerError(f"cannot send a raw record: {exc!r}") from exc

    def reply_wait_ms(self) -> int:
        """The broker's longest wait for the next reply fetch (asked as each is built).

        The embedded broker notices records that arrive while it holds a fetch only
        every so often (at a 30-ms wait, p50 about 6 ms and p99 about 18 after the
        record), so a longer wait adds to an answer's latency. While requests are
        still submitted, it is ``fetch_max_wait_ms``. Once the youngest waiting
        request is older, the fetch may wait
        ``reply_wait_share`` of its age (up to ``idle_fetch_max_wait_ms``): no
        waiting answer is then delayed by more than that share of its latency so
        far, while a burst's tail is read with a fraction of the polls.

        A bulk client (``bulk_fetch_wait_ms``) turns that around: while it keeps
        submitting, its answers free the slots for more and no single one is
        awaited, so it reads them in bulk; once nothing has been submitted for
        twice that wait (the last answers of a job), every fetch that waits longer
        than ``fetch_max_wait_ms`` only holds back the job's end.

        With nothing waiting it is ``fetch_max_wait_ms``, and once nothing has been
        submitted for ``idle_after_ms``, ``idle_fetch_max_wait_ms``: an idle client
        polling a hundred times a second costs itself and the broker a few percent
        of a core each, and only the first answer after the quiet spell may come
        later for it, by a share of that wait, as the router's idle fetches do.
        """
        s = self.settings
        age_ms = (time.monotonic() - self._last_submit_s) * 1000
        if not self._pending:
            if age_ms >= s.idle_after_ms:
                return max(self.fetch_max_wait_ms, s.idle_fetch_max_wait_ms)
            return self.fetch_max_wait_ms
        if self.bulk_fetch_wait_ms is not None:
            if age_ms < 2 * self.bulk_fetch_wait_ms:
                return self.bulk_fetch_wait_ms
            return self.fetch_max_wait_ms
        wait_ms = int(age_ms * s.reply_wait_share)
        return max(s.fetch_max_wait_ms, min(wait_ms, s.idle_fetch_max_wait_ms))

    async def _read(self, consumer: Any) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=_POLL_MS, max_records=10_000)
            except KafkaError as exc:
                log.warning("client %s: reading responses failed: %r", self.client_id, exc)
                await asyncio.sleep(_ERROR_BACKOFF_MS / 1000)
                continue
            for records in batches.values():
                for record in records:
                    self._dispatch(record)

    def _dispatch(self, record: Any) -> None:
        response = self._invalid.parse(record.value, record.topic, record.partition, record.offset)
        if response is None:
            return
        self.received += 1
        fut = self._pending.get(response.id)
        if fut is None or fut.done():
            if response.id in self._resolved:
                self.duplicates += 1
            else:
                self.unmatched += 1
            return
        fut.set_result(response)
        self._resolved[response.id] = None
        if len(self._resolved) > _RESOLVED_MEMORY:
            self._resolved.popitem(last=False)


def _request_id(request: InferenceRequest | Mapping[str, Any]) -> str:
    return request.id if isinstance(request, InferenceRequest) else str(request.get("id"))
