"""Tracing through real router and worker processes: OTLP/HTTP spans under the request's trace."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid

import pytest

from agents.processes import ServeProcess
from agents.serve import prepare_topics
from pipeline.client import InferenceClient
from tests.integration.conftest import Pipeline
from tests.otlp_collector import OtlpCollector

pytestmark = pytest.mark.broker


async def test_a_requests_spans_reach_the_collector(pipeline: Pipeline) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    with OtlpCollector() as collector:
        # A pipeline of its own (own topics), so that tracing is on in both roles.
        s = pipeline.settings.model_copy(update={
            "topic_prefix": f"tr-{uuid.uuid4().hex[:8]}", "otlp_endpoint": collector.endpoint,
        })
        await prepare_topics(s, pipeline.bootstrap, ["digits"])
        proc = ServeProcess(s, pipeline.bootstrap, "all", models=["digits"],
                            worker_id="it-traced")
        await proc.start()
        try:
            async with InferenceClient(s, bootstrap_servers=pipeline.bootstrap) as client:
                await client.wait_until_served("digits", {"input": pipeline.x[:1]})
                resp = await client.infer(
                    "digits", {"input": pipeline.x[:3]},
                    headers=[("traceparent", f"00-{trace_id}-{parent_id}-01".encode())],
                )
            assert resp.status == "ok"
            deadline = time.monotonic() + 60
            while True:
                spans = [sp for sp in collector.received() if sp.trace_id == trace_id]
                if {sp.name for sp in spans} >= {"route", "queue", "batch", "compute"}:
                    break
                if time.monotonic() > deadline or proc.returncode is not None:
                    pytest.fail(f"spans so far {spans}:\n{proc.tail()}")
                await asyncio.sleep(0.5)
        finally:
            code = await proc.stop()
        assert code == 0, proc.tail()

    by_name = {sp.name: sp for sp in spans}
    assert len(spans) == 4  # one of each: the readiness probes carried no trace context
    for name in ("route", "queue", "batch"):
        assert by_name[name].parent_span_id == parent_id
    assert by_name["compute"].parent_span_id == by_name["batch"].span_id
    assert by_name["route"].service == "inferline-router"
    assert by_name["compute"].service == "inferline-worker"
    assert {sp.attributes["inferline.request_id"] for sp in spans} == {resp.id}
    assert by_name["batch"].attributes["inferline.batch_rows"] >= 3
    # The spans sit where the response's own timing puts them.
    assert resp.timing is not None
    queue_ms = (by_name["queue"].end_ns - by_name["queue"].start_ns) / 1e6
    assert queue_ms == pytest.approx(resp.timing.queue_ms, abs=0.01)
    compute_ms = (by_name["compute"].end_ns - by_name["compute"].start_ns) / 1e6
    assert compute_ms == pytest.approx(resp.timing.compute_ms, abs=0.01)
    assert by_name["batch"].start_ns == by_name["queue"].end_ns
    assert by_name["batch"].start_ns <= by_name["compute"].start_ns
    assert by_name["compute"].end_ns <= by_name["batch"].end_ns
