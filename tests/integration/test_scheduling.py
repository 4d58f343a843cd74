"""Priority lanes and deadlines against the real broker and worker process."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from pipeline.client import InferenceClient
from pipeline.codec import encode_list
from schemas.messages import InferenceResponse
from tests.integration.conftest import Pipeline, read_topic

pytestmark = pytest.mark.broker


def scrape(pipeline: Pipeline) -> dict[str, float]:
    """Sum of each series of the worker's /metrics, over all its label sets."""
    port = pipeline.worker.settings.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def test_expired_lane_record_answered_without_reaching_the_model(
    pipeline: Pipeline, client: InferenceClient
) -> None:
    s = pipeline.settings
    # Straight onto the lane, stamped 10 s ago with a 1 s timeout: the router's check
    # is bypassed, so only the worker can answer it.
    rid = f"stale-{uuid.uuid4().hex[:8]}"
    request = {
        "id": rid, "model": "digits", "priority": "normal", "timeout_ms": 1000,
        "reply_to": client.reply_topic,
        "inputs": [encode_list("input", pipeline.x[:1])],
    }
    before = scrape(pipeline)
    fut = client.expect(rid)
    producer = AIOKafkaProducer(bootstrap_servers=pipeline.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            s.lane_topic("digits", "normal"), orjson.dumps(request), key=rid.encode(),
            timestamp_ms=int(time.time() * 1000) - 10_000,
        )
    finally:
        await producer.stop()
    resp = await asyncio.wait_for(fut, 30)
    assert resp.status == "expired"
    assert resp.error is not None and resp.error.code == "DEADLINE_EXCEEDED"
    assert resp.outputs == []
    await asyncio.sleep(1.0)  # let the metrics of any batch that might have run land
    after = scrape(pipeline)
    # Nothing was computed for it: no ONNX Runtime call happened meanwhile.
    assert after["inferline_batch_size_count"] == before["inferline_batch_size_count"]


async def test_high_priority_overtakes_a_queued_batch_backlog(
    pipeline: Pipeline, client: InferenceClient
) -> None:
    x = pipeline.x
    n_bulk = 30_000
    rows = [encode_list("input", x[i % len(x): i % len(x) + 1]) for i in range(64)]
    # The bulk goes straight onto the batch lane, faster than the worker can serve it,
    # so that a backlog of several seconds of work waits there.
    bulk = []
    producer = AIOKafkaProducer(
        bootstrap_servers=pipeline.bootstrap, linger_ms=20, max_batch_size=1_048_576
    )
    await producer.start()
    try:
        sends = []
        for i in range(n_bulk):
            rid = f"bulk-{uuid.uuid4().hex}"
            bulk.append(client.expect(rid))
            value = orjson.dumps({
                "id": rid, "model": "digits", "priority": "batch",
                "reply_to": client.reply_topic, "inputs": [rows[i % 64]],
            })
            sends.append(await producer.send(
                pipeline.settings.lane_topic("digits", "batch"), value, key=rid.encode()
            ))
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    # Wait until the worker is into the bulk: a backlog of seconds of work remains. The
    # client reads answers behind the worker, by up to seconds on a loaded machine:
    # counted at the client, a later mark could find the worker already at the end.
    started = asyncio.Event()
    answered = [0]

    def count(_: object) -> None:
        answered[0] += 1
        if answered[0] >= 100:
            started.set()

    for f in bulk:
        f.add_done_callback(count)
    await asyncio.wait_for(started.wait(), 120)
    high = []
    for i in range(20):
        fut = await client.submit({
            "id": f"high-{uuid.uuid4().hex}", "model": "digits", "priority": "high",
            "inputs": [rows[i]],
        })
        high.append(fut)
    _, pending = await asyncio.wait([*bulk, *high], timeout=120)
    assert not pending, f"{len(pending)} requests unanswered"
    assert all(f.result().status == "ok" for f in high)
    assert all(f.result().status == "ok" for f in bulk)
    # The order the worker answered in: its answer records' timestamps (the client
    # reads its reply partitions unevenly, seconds behind, so arrival order at the
    # client says little). In arrival order every bulk request, all produced before
    # them, would be answered before the high-priority ones; served first, these
    # overtake the waiting bulk.
    kinds = {f.result().id: kind for kind, futs in (("bulk", bulk), ("high", high))
             for f in futs}
    answers = sorted((r.timestamp, kinds[r.key.decode()])
                     for r in await read_topic(pipeline.bootstrap, client.reply_topic)
                     if r.key is not None and r.key.decode() in kinds)
    order = [kind for _, kind in answers]
    last_high = max(i for i, kind in enumerate(order) if kind == "high")
    bulk_after = sum(1 for kind in order[last_high:] if kind == "bulk")
    assert bulk_after >= 1_000, (last_high, bulk_after)
    high_total = max(_total_ms(f.result()) for f in high)
    bulk_totals = sorted(_total_ms(f.result()) for f in bulk)
    assert high_total < bulk_totals[len(bulk_totals) // 2], (high_total, bulk_totals[::3000])


def _total_ms(resp: InferenceResponse) -> float:
    assert resp.timing is not None
    return resp.timing.total_ms
