"""InferenceClient and ResponseConsumer against the real broker and a small responder.

The pipeline itself is not involved: a raw aiokafka consumer of the requests topic
stands in for it and answers on each request's ``reply_to``. What it does depends
on the requested model: ``echo`` answers once with the input echoed back, ``dup``
answers twice, ``silent`` (or any other model) never answers. These tests use a
topic prefix of their own, so that the responder and a real pipeline running in
the same session never see each other's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from confluent_kafka import Producer as LibrdkafkaProducer

from pipeline.client import InferenceClient, ResponseConsumer
from pipeline.errors import BrokerError, ClientTimeout, InvalidRequest
from pipeline.settings import Settings
from pipeline.topics import crc32_partitioner, ensure_topics
from schemas.messages import InferenceRequest, InferenceResponse

pytestmark = pytest.mark.broker
log = logging.getLogger(__name__)


def _response(request: dict[str, Any]) -> dict[str, Any]:
    tensor = request["inputs"][0]
    return {
        "id": request["id"], "model": request["model"], "version": "1", "status": "ok",
        "outputs": [{**tensor, "name": "echo"}],
        "timing": {"queue_ms": 0.1, "batch_wait_ms": 0.0, "compute_ms": 0.2, "total_ms": 0.3},
        "batch_size": 1, "worker": "responder", "execution_provider": "none",
    }


class Responder:
    """Answers requests from the requests topic; positioned at its end when started."""

    def __init__(self, settings: Settings, bootstrap: str) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.answered = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        topic = self.settings.topic("requests")
        await ensure_topics(self.settings, self.bootstrap, [topic])
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=1)
        # The embedded broker waits out a fetch's max wait even when records arrive.
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, fetch_max_wait_ms=10)
        await self.producer.start()
        await self.consumer.start()
        tps = [TopicPartition(topic, p) for p in sorted(await self.producer.partitions_for(topic))]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now, before any test produces
            await self.consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            await self.consumer.stop()
            await self.producer.stop()

    async def _run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    try:
                        await self._answer(record)
                    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                        # Not the responder's job to judge requests; keep serving the rest.
                        log.warning("responder skips %s@%d: %r", record.topic, record.offset, exc)

    async def _answer(self, record: Any) -> None:
        request = orjson.loads(record.value)
        copies = {"echo": 1, "dup": 2}.get(request.get("model"), 0)
        headers = [(k, v) for k, v in record.headers if k == "traceparent"]
        for _ in range(copies):
            await self.producer.send(
                request["reply_to"], orjson.dumps(_response(request)),
                key=request["id"].encode(), headers=headers,
            )
        self.answered += 1


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    """The session settings under a topic prefix of this module's own."""
    return settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}-client"})


@pytest.fixture(scope="module")
async def responder(settings: Settings, broker: str) -> AsyncIterator[Responder]:
    r = Responder(settings, broker)
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def client(settings: Settings, broker: str, responder: Responder) -> AsyncIterator[
    InferenceClient
]:
    async with InferenceClient(settings, bootstrap_servers=broker) as c:
        yield c


async def _until(predicate: Any) -> None:
    # Counters have no event to wait on. No deadline of our own: pytest-timeout bounds
    # a test that never gets there.
    while not predicate():  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def test_many_requests_in_flight_resolve_to_their_ids(client: InferenceClient) -> None:
    data = np.arange(500 * 4, dtype=np.float32).reshape(500, 4)
    responses = await asyncio.gather(*(
        client.infer("echo", {"input": data[i : i + 1]}, id=f"req-{i}") for i in range(500)
    ))
    for i, response in enumerate(responses):
        assert response.id == f"req-{i}"
        assert response.status == "ok"
        assert response.outputs[0].data == data[i].tolist()
        assert response.outputs[0].shape == [1, 4]
    assert client.in_flight == 0
    assert client.stats()["submitted"] == 500
    assert client.duplicates == client.unmatched == client.invalid == 0


async def test_infer_many_keeps_request_order(client: InferenceClient) -> None:
    requests: list[InferenceRequest | dict[str, Any]] = [
        InferenceRequest.model_validate({
            "id": f"many-{i}", "model": "echo",
            "inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [i]}],
        })
        for i in range(100)
    ]
    # A plain dict with numpy data goes out as given, with reply_to filled in.
    requests.append({
        "id": "many-dict", "model": "echo",
        "inputs": [{"name": "x", "shape": [2], "datatype": "INT32", "data": np.array([7, 8])}],
    })
    responses = await client.infer_many(requests)
    assert [r.id for r in responses] == [f"many-{i}" for i in range(100)] + ["many-dict"]
    assert [r.outputs[0].data for r in responses[:3]] == [[0], [1], [2]]
    assert responses[-1].outputs[0].data == [7, 8]


async def test_timeout_when_nobody_answers(client: InferenceClient) -> None:
    with pytest.raises(ClientTimeout) as info:
        await client.infer("silent", {"x": np.zeros(1, np.float32)}, id="quiet-1",
                           wait_timeout_ms=200)
    assert info.value.request_id == "quiet-1"
    assert client.in_flight == 0
    with pytest.raises(ClientTimeout):
        await client.infer_many(
            [{"id": "quiet-2", "model": "silent", "inputs": [{"name": "x"}]}], wait_timeout_ms=100
        )
    assert client.in_flight == 0


async def test_duplicates_unmatched_and_invalid_are_counted(client: InferenceClient) -> None:
    response = await client.infer("dup", {"x": np.ones(2, np.float64)}, id="twice")
    assert response.id == "twice"
    await _until(lambda: client.duplicates == 1)
    stranger = InferenceResponse(id="nobody-asked", model="echo", status="ok")
    await client.send_raw(stranger.model_dump_json().encode(), topic=client.reply_topic)
    await client.send_raw(b"{not json", topic=client.reply_topic)
    await client.send_raw(b'{"id": "x"}', topic=client.reply_topic)
    await _until(lambda: client.unmatched == 1 and client.invalid == 2)
    # The client keeps working after all that.
    assert (await client.infer("echo", {"x": np.ones(1, np.int8)})).status == "ok"
    assert client.duplicates == 1


async def test_reply_fetches_wait_longer_once_the_youngest_waiting_request_is_old(
    settings: Settings, broker: str, responder: Responder
) -> None:
    s = settings.model_copy(update={"reply_wait_share": 0.1, "idle_fetch_max_wait_ms": 300})
    async with InferenceClient(s, bootstrap_servers=broker) as c:
        assert c.dynamic_fetch_wait
        fetcher: Any = c._consumer._fetcher
        # Nothing waiting: the ordinary wait.
        assert c.reply_wait_ms() == s.fetch_max_wait_ms
        quiet = c.expect("never-answered")
        assert c.reply_wait_ms() == s.fetch_max_wait_ms  # just submitted
        # 0.1 of the youngest waiting request's age, up to idle_fetch_max_wait_ms; the
        # fetch requests built meanwhile carry it.
        await asyncio.sleep(1.0)
        assert 100 <= c.reply_wait_ms() <= 200
        await asyncio.sleep(3.0)
        assert c.reply_wait_ms() == 300
        assert fetcher._fetch_max_wait_ms == 300
        # A new request is young: the next fetch is short again, and its answer comes.
        answered = await c.infer("echo", {"x": np.ones(1, np.int8)}, wait_timeout_ms=30_000)
        assert answered.status == "ok"
        assert c.reply_wait_ms() < 300
        quiet.cancel()
        await asyncio.sleep(0)
        assert c.in_flight == 0 and c.reply_wait_ms() == s.fetch_max_wait_ms
        await asyncio.sleep(0.5)
        assert fetcher._fetch_max_wait_ms == s.fetch_max_wait_ms
    # A wait given to the client, or no share, keeps the wait fixed.
    for fixed in ({"fetch_max_wait_ms": 100}, {}):
        t = s if fixed else s.model_copy(update={"reply_wait_share": 0.0})
        async with InferenceClient(t, bootstrap_servers=broker, **fixed) as c:
            assert not c.dynamic_fetch_wait


async def test_an_idle_client_polls_for_replies_at_the_idle_wait(
    settings: Settings, broker: str, responder: Responder
) -> None:
    s = settings.model_copy(update={"idle_after_ms": 400, "idle_fetch_max_wait_ms": 300})
    async with InferenceClient(s, bootstrap_servers=broker) as c:
        fetcher: Any = c._consumer._fetcher
        # Nothing waiting and nothing submitted for idle_after_ms: the idle wait.
        await asyncio.sleep(0.8)
        assert c.reply_wait_ms() == 300
        assert fetcher._fetch_max_wait_ms == 300
        # A request ends the quiet spell: short waits while it waits, and after it.
        answered = await c.infer("echo", {"x": np.ones(1, np.int8)}, wait_timeout_ms=30_000)
        assert answered.status == "ok"
        assert c.in_flight == 0 and c.reply_wait_ms() == s.fetch_max_wait_ms
        await asyncio.sleep(0.8)
        assert c.reply_wait_ms() == 300


async def test_a_bulk_client_reads_in_bulk_while_it_submits_and_not_its_last_answers(
    settings: Settings, broker: str, responder: Responder
) -> None:
    async with InferenceClient(settings, bootstrap_servers=broker,
                               bulk_fetch_wait_ms=200) as c:
        assert c.dynamic_fetch_wait
        fetcher: Any = c._consumer._fetcher
        assert c.reply_wait_ms() == settings.fetch_max_wait_ms  # nothing waiting
        quiet = c.expect("bulk-never-answered")
        assert c.reply_wait_ms() == 200
        await asyncio.sleep(0.1)
        assert fetcher._fetch_max_wait_ms == 200
        # Nothing submitted for twice the bulk wait: the answers still due are a
        # job's last, read at the ordinary wait.
        await asyncio.sleep(0.8)
        assert c.reply_wait_ms() == settings.fetch_max_wait_ms
        assert fetcher._fetch_max_wait_ms == settings.fetch_max_wait_ms
        answered = await c.infer("echo", {"x": np.ones(1, np.int8)}, wait_timeout_ms=30_000)
        assert answered.status == "ok"
        quiet.cancel()
    # A bulk wait no longer than the ordinary one changes nothing.
    async with InferenceClient(settings, bootstrap_servers=broker,
                               bulk_fetch_wait_ms=settings.fetch_max_wait_ms) as c:
        assert not c.dynamic_fetch_wait


async def test_expect_and_send_raw(client: InferenceClient) -> None:
    request = {
        "id": "raw-1", "model": "echo", "reply_to": client.reply_topic,
        "inputs": [{"name": "x", "shape": [1], "datatype": "BOOL", "data": [True]}],
    }
    fut = client.expect("raw-1")
    with pytest.raises(InvalidRequest):
        client.expect("raw-1")
    await client.send_raw(orjson.dumps(request), key=b"raw-1",
                          headers=[("traceparent", b"00-abc-def-01")])
    response = await fut
    assert response.id == "raw-1" and response.outputs[0].data == [True]


async def test_librdkafka_producer_interoperates(
    client: InferenceClient, settings: Settings, broker: str
) -> None:
    request = {
        "id": "from-librdkafka", "model": "echo", "reply_to": client.reply_topic,
        "inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [0.5, 1.5, 2.5]}],
    }
    fut = client.expect("from-librdkafka")
    delivered: list[Any] = []
    producer = LibrdkafkaProducer({"bootstrap.servers": broker, "linger.ms": 0})
    producer.produce(
        settings.topic("requests"), orjson.dumps(request), key=b"from-librdkafka",
        on_delivery=lambda err, msg: delivered.append((err, msg.partition())),
    )
    assert await asyncio.to_thread(producer.flush, 30) == 0
    assert delivered[0][0] is None
    # librdkafka's default partitioner agrees with ours on keyed records.
    partitions = list(range(settings.partitions))
    assert delivered[0][1] == crc32_partitioner(b"from-librdkafka", partitions, partitions)
    response = await fut
    assert response.id == "from-librdkafka"
    assert response.outputs[0].data == [0.5, 1.5, 2.5]


async def test_input_errors_and_lifecycle(settings: Settings, broker: str) -> None:
    c = InferenceClient(settings, bootstrap_servers=broker, client_id="life")
    assert c.reply_topic == f"{settings.topic_prefix}.responses.life"
    with pytest.raises(BrokerError, match="not started"):
        await c.submit({"id": "early", "model": "echo"})
    await c.start()
    await c.start()
    with pytest.raises(InvalidRequest):
        await c.infer("bad model name!", {"x": np.zeros(1, np.float32)})
    with pytest.raises(InvalidRequest, match="id"):
        await c.submit({"model": "echo"})
    with pytest.raises(InvalidRequest, match="max_request_bytes"):
        await c.submit({"id": "huge", "model": "echo", "blob": "x" * settings.max_request_bytes})
    pending = await c.submit({"id": "never", "model": "silent", "inputs": []})
    await c.stop()
    await c.stop()
    with pytest.raises(BrokerError, match="stopped"):
        await pending
    with pytest.raises(ValueError, match="topic"):
        InferenceClient(settings, bootstrap_servers=broker, client_id="no spaces")


async def test_response_consumer_yields_valid_responses(
    client: InferenceClient, settings: Settings, broker: str
) -> None:
    # A single member never needs long timeouts, and shorter ones make joins faster.
    settings = settings.model_copy(
        update={"session_timeout_ms": 1_500, "heartbeat_interval_ms": 300}
    )
    # One partition, so that the order of records is the order they were sent in.
    topic = f"{settings.topic_prefix}.responses.rc-{uuid.uuid4().hex[:6]}"
    await ensure_topics(settings, broker, [topic], partitions=1)
    group = f"{settings.topic_prefix}-rc-{uuid.uuid4().hex[:6]}"

    async def send(ids: list[str]) -> None:
        for i in ids:
            body = InferenceResponse(id=i, model="echo", status="ok").model_dump_json()
            await client.send_raw(body.encode(), key=i.encode(), topic=topic,
                                  headers=[("traceparent", f"tp-{i}".encode())])

    def consume() -> ResponseConsumer:
        return ResponseConsumer(settings, bootstrap_servers=broker, topics=[topic],
                                group_id=group, from_beginning=True)

    await send([f"r{i}" for i in range(5)])
    await client.send_raw(b"\xff garbage", topic=topic)
    await send([f"r{i}" for i in range(5, 10)])
    seen: dict[str, bytes] = {}
    async with consume() as consumer:
        async for item in consumer:
            assert item.topic == topic and item.partition == 0
            seen[item.response.id] = dict(item.headers)["traceparent"]
            if item.response.id == "r9":
                break
        assert consumer.invalid == 1
    assert seen == {f"r{i}": f"tp-r{i}".encode() for i in range(10)}

    # The group resumes after what was processed. r9 was yielded but never followed
    # by a request for the next item, so it is delivered again (at-least-once).
    await send(["after"])
    async with consume() as again:
        assert (await anext(again)).response.id == "r9"
        assert (await anext(again)).response.id == "after"
        await again.commit()
    async with consume() as third:
        await send(["last"])
        assert (await anext(third)).response.id == "last"
