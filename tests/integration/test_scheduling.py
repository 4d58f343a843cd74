"""Priority lanes and deadlines against the real broker and worker process."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from agents.processes import ServeProcess
from agents.serve import prepare_topics
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
    pipeline: Pipeline, tmp_path: Path
) -> None:
    # A pipeline of its own whose worker starts only once a batch backlog and then the
    # high-priority requests are queued: the backlog is there whatever the relative
    # speeds of this host's producer and worker (a running worker on a fast host can
    # keep up with a producer, so no backlog ever forms).
    s = pipeline.settings.model_copy(update={
        "topic_prefix": f"prio-{uuid.uuid4().hex[:10]}", "state_dir": tmp_path,
        "metrics_port": 0,
    })
    bootstrap = pipeline.bootstrap
    await prepare_topics(s, bootstrap, ["digits"])
    router = ServeProcess(s, bootstrap, "router", models=["digits"], worker_id="prio-router")
    worker = ServeProcess(s, bootstrap, "worker", models=["digits"], worker_id="prio-worker")
    x = pipeline.x
    n_bulk = 12_000
    rows = [encode_list("input", x[i % len(x): i % len(x) + 1]) for i in range(64)]
    await router.start()
    try:
        async with InferenceClient(s, bootstrap_servers=bootstrap) as client:
            bulk = []
            producer = AIOKafkaProducer(
                bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1_048_576
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
                        s.lane_topic("digits", "batch"), value, key=rid.encode()
                    ))
                await asyncio.gather(*sends)
            finally:
                await producer.stop()
            # The highs take the whole path: the client's request topic, the router, the
            # lane, where they wait behind the backlog until the worker starts.
            high_ids = [f"high-{uuid.uuid4().hex}" for _ in range(20)]
            high = [
                await client.submit({
                    "id": rid, "model": "digits", "priority": "high", "inputs": [rows[i]],
                })
                for i, rid in enumerate(high_ids)
            ]
            # Counted by reading the lane: the embedded broker's end offsets stop one past
            # the first record of a partition's last batch, not past its last record.
            deadline = time.monotonic() + 60
            while True:
                routed = {r.key.decode() for r in await read_topic(
                    bootstrap, s.lane_topic("digits", "high"), idle_ms=300
                ) if r.key is not None}
                if routed >= set(high_ids):
                    break
                assert router.returncode is None, router.tail()
                assert time.monotonic() < deadline, f"highs not routed:\n{router.tail()}"
                await asyncio.sleep(0.2)
            await worker.start()
            _, pending = await asyncio.wait([*bulk, *high], timeout=120)
            assert not pending, f"{len(pending)} requests unanswered:\n{worker.tail()}"
            assert all(f.result().status == "ok" for f in high)
            assert all(f.result().status == "ok" for f in bulk)
            # The order the worker answered in: its answer records' timestamps (the
            # client reads its reply partitions unevenly, seconds behind, so arrival
            # order at the client says little). In arrival order every bulk request,
            # all queued before them, would be answered before the high-priority ones;
            # served first, these overtake nearly all of the waiting bulk (all but what
            # the worker's first fetches put in its hands).
            kinds = {f.result().id: kind for kind, futs in (("bulk", bulk), ("high", high))
                     for f in futs}
            answers = sorted((r.timestamp, kinds[r.key.decode()])
                             for r in await read_topic(bootstrap, client.reply_topic)
                             if r.key is not None and r.key.decode() in kinds)
            order = [kind for _, kind in answers]
            last_high = max(i for i, kind in enumerate(order) if kind == "high")
            bulk_after = sum(1 for kind in order[last_high:] if kind == "bulk")
            assert bulk_after >= n_bulk // 2, (last_high, bulk_after)
            high_total = max(_total_ms(f.result()) for f in high)
            bulk_totals = sorted(_total_ms(f.result()) for f in bulk)
            assert high_total < bulk_totals[len(bulk_totals) // 2], (
                high_total, bulk_totals[::1000]
            )
    finally:
        codes = [await worker.stop(), await router.stop()]
    assert codes == [0, 0], f"exit codes {codes}:\n{router.tail()}\n{worker.tail()}"


def _total_ms(resp: InferenceResponse) -> float:
    assert resp.timing is not None
    return resp.timing.total_ms
