"""End to end through the real broker: router and worker processes, the digits model."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer

from pipeline import codec
from pipeline.client import InferenceClient, ResponseConsumer
from pipeline.registry import Registry
from pipeline.session import ModelSession
from tests.integration.conftest import Pipeline, read_topic


def _request(x: np.ndarray[Any, Any], rid: str, **extra: Any) -> dict[str, Any]:
    rows = x.reshape(-1, 64)
    return {
        "id": rid,
        "model": "digits",
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32",
             "data": rows.ravel().tolist()}
        ],
        **extra,
    }


async def _send_stamped(p: Pipeline, value: bytes, key: str, age_ms: int) -> None:
    """Produce a request record whose timestamp lies ``age_ms`` in the past."""
    producer = AIOKafkaProducer(bootstrap_servers=p.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(p.settings.topic("requests"), value, key=key.encode(),
                                     timestamp_ms=int(time.time() * 1000) - age_ms)
    finally:
        await producer.stop()


def _predict(p: Pipeline, x: np.ndarray[Any, Any]) -> list[int]:
    """Labels the model gives in-process, with ONNX Runtime directly."""
    spec = Registry.load(p.settings.registry_path).resolve("digits")
    with ModelSession(spec, provider="cpu") as session:
        session.load()
        return [int(v) for v in session.run({"input": x})["label"]]


def _labels(resp: Any) -> list[int]:
    out = {o.name: o for o in resp.outputs}
    return [int(v) for v in out["label"].data]


async def test_digits_request_to_response(pipeline: Pipeline, client: InferenceClient) -> None:
    x, y = pipeline.x[:60], pipeline.y[:60]
    expected = _predict(pipeline, x)
    responses = await client.infer_many(
        [_request(row, f"e2e-{i}-{uuid.uuid4().hex[:6]}") for i, row in enumerate(x)]
    )
    assert [r.status for r in responses] == ["ok"] * len(x)
    got = [_labels(r)[0] for r in responses]
    # The pipeline must give exactly what the model gives in-process ...
    assert got == expected
    # ... which, for real trained weights, is mostly the true digit.
    assert np.mean(np.array(got) == y) >= 0.9
    for r in responses:
        assert r.model == "digits" and r.version == "1"
        assert r.worker == "it-worker"
        assert r.execution_provider == "CPUExecutionProvider"
        assert r.batch_size >= 1 and r.cost_usd > 0
        assert r.timing is not None and r.timing.total_ms >= r.timing.compute_ms > 0
        probs = {o.name: o for o in r.outputs}["probabilities"]
        assert probs.shape == [1, 10] and abs(sum(probs.data) - 1) < 1e-4


async def test_multi_row_request_is_split_back(pipeline: Pipeline, client: InferenceClient) -> None:
    x = pipeline.x[100:105]
    resp = await client.infer("digits", {"input": x})
    assert resp.status == "ok"
    assert {o.name: o.shape for o in resp.outputs} == {"label": [5], "probabilities": [5, 10]}
    assert _labels(resp) == _predict(pipeline, x)


async def _dlq_records(p: Pipeline, match: Any, want: int, timeout_s: float = 30) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [r for r in await read_topic(p.bootstrap, p.settings.topic("dlq"), idle_ms=300)
                 if match(r)]
        if len(found) >= want or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.3)


async def test_malformed_requests_get_errors_and_dlq_records(
    pipeline: Pipeline, client: InferenceClient
) -> None:
    tag = uuid.uuid4().hex[:8]
    good = pipeline.x[0]
    with_id = {
        "INVALID_INPUT:shape": {**_request(good, ""), "inputs": [
            {"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]},
        "INVALID_INPUT:datatype": {**_request(good, ""), "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "INT64", "data": [1] * 64}]},
        "INVALID_INPUT:data-length": {**_request(good, ""), "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 60}]},
        "UNKNOWN_MODEL:model": {**_request(good, ""), "model": "no-such-model"},
        "UNKNOWN_MODEL:version": {**_request(good, ""), "version": "99"},
        "INVALID_REQUEST:priority": {**_request(good, ""), "priority": "urgent"},
        "INVALID_REQUEST:binary_data_output": {
            **_request(good, ""), "parameters": {"binary_data_output": "yes"}},
        "INVALID_INPUT:base64-length": {**_request(good, ""), "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ["AACAPw=="],
             "parameters": {"content_type": "base64"}}]},
    }
    futures = {}
    for case, body in with_id.items():
        rid = f"bad-{case.replace(':', '-')}-{tag}"
        futures[case] = client.expect(rid)
        value = orjson.dumps({**body, "id": rid, "reply_to": client.reply_topic})
        await client.send_raw(value, key=rid.encode())
    # Records without a recoverable id: only the DLQ can hold them.
    no_id = {
        "invalid-json": b'{"id": "broken-' + tag.encode() + b'", "model": "digits", "inputs": [',
        "missing-id": orjson.dumps({**_request(good, ""), "id": None, "tag": tag}),
        "not-utf8": b"\xff\xfe" + tag.encode(),
    }
    for case, value in no_id.items():
        await client.send_raw(value, key=f"noid-{case}-{tag}".encode())

    for case, fut in futures.items():
        code = case.split(":")[0]
        resp = await asyncio.wait_for(fut, 30)
        assert resp.status == "error", (case, resp)
        assert resp.error is not None and resp.error.code == code, (case, resp.error)
        assert resp.error.message and resp.outputs == []

    records = await _dlq_records(pipeline, lambda r: tag.encode() in (r.key or b""),
                                 want=len(with_id) + len(no_id))
    by_key = {r.key.decode(): dict(r.headers) for r in records}
    assert len(by_key) == len(with_id) + len(no_id), sorted(by_key)
    for key, headers in by_key.items():
        # The envelope is checked by the router, tensor contents by the worker.
        source = headers["inferline-source-topic"]
        if headers["inferline-error-code"] == b"INVALID_INPUT":
            assert source == pipeline.settings.lane_topic("digits", "normal").encode(), key
        else:
            assert source == pipeline.settings.topic("requests").encode(), key
        assert headers["inferline-error-message"]
        if key.startswith("noid-"):
            assert headers["inferline-error-code"] == b"INVALID_REQUEST", key
    # The original bytes are kept, so nothing is lost.
    raw = {r.key.decode(): r.value for r in records}
    assert raw[f"noid-invalid-json-{tag}"] == no_id["invalid-json"]

    # ... and the pipeline keeps serving.
    assert (await client.infer("digits", {"input": pipeline.x[:1]})).status == "ok"


async def test_binary_data_output_answers_the_values_of_a_json_answer(
    pipeline: Pipeline, client: InferenceClient
) -> None:
    x = np.ascontiguousarray(pipeline.x[200:206], dtype=np.float32)
    as_json = await client.infer("digits", {"input": x})
    # The same rows sent as a base64 buffer, the answer asked for as base64 buffers.
    binary_input = [{**codec.encode("input", x, binary=True)}]
    as_binary = await client.infer_many([{
        "id": f"bin-{uuid.uuid4().hex[:8]}", "model": "digits", "inputs": binary_input,
        "parameters": {"binary_data_output": True}}])
    resp = as_binary[0]
    assert (as_json.status, resp.status) == ("ok", "ok")
    json_out = {o.name: o for o in as_json.outputs}
    for out in resp.outputs:
        assert out.parameters == {"content_type": "base64"} and len(out.data) == 1
        assert out.shape == json_out[out.name].shape and out.datatype == json_out[out.name].datatype
    got = {o.name: codec.to_numpy(o) for o in resp.outputs}
    want = {o.name: codec.to_numpy(o.model_dump()) for o in as_json.outputs}
    assert got["label"].tolist() == want["label"].tolist() == _predict(pipeline, x)
    # Float32 values as the worker computed them; the JSON answer's decimals read back
    # to the same float32 values.
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=1e-6, atol=1e-7)
    assert got["probabilities"].dtype == np.float32


async def test_burst_forms_batches(pipeline: Pipeline, client: InferenceClient) -> None:
    n = 500
    x = pipeline.x
    responses = await client.infer_many(
        [_request(x[i % len(x)], f"burst-{i}-{uuid.uuid4().hex[:6]}") for i in range(n)],
        wait_timeout_ms=60_000,
    )
    assert all(r.status == "ok" for r in responses)
    sizes = [r.batch_size for r in responses]
    assert np.mean(sizes) > 1, f"mean batch size {np.mean(sizes)}"
    assert max(sizes) <= 64  # the registry's max_batch_size
    # Every member pays for its share of its batch's compute, so nobody rides free.
    assert all(r.cost_usd > 0 for r in responses)


async def test_expired_request_is_answered_without_compute(
    pipeline: Pipeline, client: InferenceClient
) -> None:
    rid = f"late-{uuid.uuid4().hex[:8]}"
    fut = client.expect(rid)
    value = orjson.dumps(_request(pipeline.x[0], rid, timeout_ms=1000,
                                  reply_to=client.reply_topic))
    # Stamped ten seconds ago: its one-second deadline has long passed.
    await _send_stamped(pipeline, value, rid, age_ms=10_000)
    resp = await asyncio.wait_for(fut, 30)
    assert resp.status == "expired"
    assert resp.error is not None and resp.error.code == "DEADLINE_EXCEEDED"
    assert resp.outputs == [] and resp.batch_size == 0 and resp.cost_usd == 0


async def test_traceparent_is_carried_to_the_response(
    pipeline: Pipeline, client: InferenceClient
) -> None:
    s = pipeline.settings
    reply = f"{s.topic_prefix}.responses.trace-{uuid.uuid4().hex[:6]}"
    rid = f"trace-{uuid.uuid4().hex[:8]}"
    trace = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with ResponseConsumer(s, bootstrap_servers=pipeline.bootstrap, topics=[reply],
                                group_id=f"trace-{rid}", from_beginning=True) as consumer:
        await client.send_raw(orjson.dumps(_request(pipeline.x[0], rid, reply_to=reply)),
                              key=rid.encode(), headers=[("traceparent", trace)])
        received = await asyncio.wait_for(consumer.__anext__(), 30)
    assert received.response.id == rid and received.response.status == "ok"
    assert dict(received.headers)["traceparent"] == trace


async def test_independent_librdkafka_producer(pipeline: Pipeline, client: InferenceClient) -> None:
    from confluent_kafka import Producer

    rid = f"rdkafka-{uuid.uuid4().hex[:8]}"
    fut = client.expect(rid)
    producer = Producer({"bootstrap.servers": pipeline.bootstrap})
    delivered: list[Any] = []
    producer.produce(
        pipeline.settings.topic("requests"), key=rid.encode(),
        value=orjson.dumps(_request(pipeline.x[3], rid, reply_to=client.reply_topic)),
        on_delivery=lambda err, msg: delivered.append(err),
    )
    assert await asyncio.to_thread(producer.flush, 30) == 0
    assert delivered == [None]
    resp = await asyncio.wait_for(fut, 30)
    assert resp.status == "ok"
    assert _labels(resp) == _predict(pipeline, pipeline.x[3:4])


async def test_latency_counts_from_the_request_record_timestamp(
    pipeline: Pipeline, client: InferenceClient
) -> None:
    rid = f"aged-{uuid.uuid4().hex[:8]}"
    fut = client.expect(rid)
    value = orjson.dumps(_request(pipeline.x[0], rid, reply_to=client.reply_topic))
    # Produced "three seconds ago" and with no deadline: it is served, and its
    # total latency must include those three seconds, through both hops.
    await _send_stamped(pipeline, value, rid, age_ms=3_000)
    resp = await asyncio.wait_for(fut, 30)
    assert resp.status == "ok" and resp.timing is not None
    assert resp.timing.total_ms >= 3_000
    assert resp.timing.queue_ms >= 3_000 - 1


async def test_worker_metrics_endpoint(pipeline: Pipeline, client: InferenceClient) -> None:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    await client.infer_many(
        [_request(pipeline.x[i], f"metrics-{i}-{uuid.uuid4().hex[:6]}") for i in range(20)]
    )
    port = pipeline.worker.settings.metrics_port
    body = await asyncio.to_thread(
        lambda: urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body) for s in fam.samples
    }
    pool = ("pool", "default")
    ok = samples[("inferline_requests_total",
                  (("model", "digits"), pool, ("priority", "normal"), ("status", "ok"),
                   ("version", "1")))]
    assert ok >= 20
    digits = (("model", "digits"), pool, ("version", "1"))
    assert samples[("inferline_batch_size_count", digits)] >= 1
    assert samples[("inferline_cost_usd_total", digits)] > 0
    ready = [v for (name, labels), v in samples.items()
             if name == "inferline_model_ready" and dict(labels)["model"] == "digits"]
    assert ready == [1.0]


async def test_offsets_are_committed_after_answers(
    pipeline: Pipeline, client: InferenceClient
) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    await client.infer_many(
        [_request(pipeline.x[i], f"commit-{i}-{uuid.uuid4().hex[:6]}") for i in range(50)]
    )
    s = pipeline.settings
    lanes = [s.lane_topic("digits", p) for p in ("high", "normal", "batch")]
    consumer = AIOKafkaConsumer(bootstrap_servers=pipeline.bootstrap,
                                group_id=s.group_id("worker"), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in lanes for p in range(s.partitions)]
        end = await consumer.end_offsets(tps)
        deadline = time.monotonic() + 30
        while True:
            committed = {tp: (await consumer.committed(tp)) or 0 for tp in tps}
            # Every lane record was answered (infer_many returned), so once the commit
            # interval has passed the group's offsets reach the end of each lane.
            if all(committed[tp] >= end[tp] for tp in tps) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        lagging = {tp: (committed[tp], end[tp]) for tp in tps if committed[tp] < end[tp]}
        assert not lagging, f"committed offsets behind the lane ends: {lagging}"
    finally:
        await consumer.stop()
