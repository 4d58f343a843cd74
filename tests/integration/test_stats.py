"""The stats agent against the broker: telemetry in, windowed metrics out, counts that match."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable

import numpy as np
import pytest

from agents.processes import ServeProcess
from pipeline.client import InferenceClient
from pipeline.metricsfeed import MetricsFeed
from pipeline.rollup import ALL_PRIORITIES, WindowStats
from pipeline.settings import Settings
from pipeline.telemetry import ClassCounts, Telemetry
from tests.integration.conftest import Pipeline

pytestmark = pytest.mark.broker

WINDOW_S = 2.0


class StepClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def _collect(
    feed: MetricsFeed, done: Callable[[list[WindowStats]], bool], stats: ServeProcess,
    timeout_s: float = 90.0,
) -> list[WindowStats]:
    records = await feed.catch_up()
    deadline = time.monotonic() + timeout_s
    while not done(records):
        if stats.returncode is not None:
            pytest.fail(f"stats agent exited with {stats.returncode}:\n{stats.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"metrics incomplete after {timeout_s}s: {len(records)} records\n"
                        f"{stats.tail()}")
        records += await feed.poll(500)
    return records


async def test_published_telemetry_is_counted_exactly(
    pipeline: Pipeline, stats_agent: ServeProcess
) -> None:
    """A real Telemetry publisher: every answer, error and dollar shows up in the windows."""
    model = f"synth-{uuid.uuid4().hex[:8]}"
    s = pipeline.settings.model_copy(update={
        "telemetry_interval_ms": 600_000,  # the test drains and publishes by hand
        "pool": "synthetic", "pool_hourly_usd": 36.0,  # one cent per second
    })
    mono = StepClock()
    tel = Telemetry(s, pipeline.bootstrap, worker_id="it-synth", monotonic=mono)
    tel.register(model, "1", "CPUExecutionProvider", 36.0)
    await tel.start()
    sent = {"normal": 0, "high": 0}
    labels: list[int] = []
    try:
        for i in range(4):
            for _ in range(10 + i):
                tel.observe(model, "1", "normal", 10.0, batch_rows=4, cost_usd=1e-4)
                sent["normal"] += 1
            for _ in range(5):
                tel.observe(model, "1", "high", 40.0, batch_rows=1, cost_usd=1e-4)
                sent["high"] += 1
            tel.observe_error(model, "1", "normal", "INVALID_INPUT")
            batch = [i, i, 3]
            labels += batch
            tel.observe_compute(model, "1", 3, 0.25, {"label": np.array(batch)})
            mono.t += 1.0
            await tel.publish(tel.drain())
            await asyncio.sleep(0.6)  # the records spread over more than one window
    finally:
        await tel.stop()  # a last heartbeat, with no time passed on the step clock

    def mine(rs: list[WindowStats]) -> list[WindowStats]:
        return [r for r in rs if r.model == model]

    def complete(rs: list[WindowStats]) -> bool:
        return sum(r.count for r in mine(rs) if r.priority == ALL_PRIORITIES) >= 70

    async with MetricsFeed(s, pipeline.bootstrap) as feed:
        records = mine(await _collect(feed, complete, stats_agent))
    whole = [r for r in records if r.priority == ALL_PRIORITIES]
    normal = [r for r in records if r.priority == "normal"]
    high = [r for r in records if r.priority == "high"]
    assert sum(r.count for r in whole) == sent["normal"] + sent["high"] + 4 == 70
    assert sum(r.ok for r in normal) == sent["normal"] == 46
    assert sum(r.count for r in normal) == 46 + 4
    assert sum(r.errors.get("INVALID_INPUT", 0) for r in normal) == 4
    assert sum(r.ok for r in high) == sent["high"] == 20
    # Latencies were all 10 ms (normal) and 40 ms (high): every window's quantiles say so.
    assert {r.p99_ms for r in normal if r.ok} == {10.0}
    assert {r.p50_ms for r in high if r.ok} == {40.0}
    assert {r.mean_batch_size for r in normal if r.ok} == {4.0}
    # Four heartbeats of 1 s at $36/h: $0.04 of capacity, a quarter of it computing.
    assert sum(r.total_cost_usd for r in whole) == pytest.approx(0.04)
    assert sum(r.compute_cost_usd for r in whole) == pytest.approx(0.01)
    assert sum(r.idle_cost_usd for r in whole) == pytest.approx(0.03)
    assert sum(r.capacity_s for r in whole) == pytest.approx(4.0)
    assert sum(r.busy_s for r in whole) == pytest.approx(1.0)
    assert sum(r.charged_usd for r in whole) == pytest.approx(66 * 1e-4)
    assert {w for r in whole for w in r.workers} == {"it-synth"}
    counts = np.zeros(4)
    for r in whole:
        if r.outputs is not None:
            assert isinstance(r.outputs, ClassCounts)
            counts[: len(r.outputs.counts)] += r.outputs.counts
    assert counts.tolist() == np.bincount(labels, minlength=4).tolist()
    for r in records:
        assert r.window_end_ms - r.window_start_ms == WINDOW_S * 1000
        assert r.window_start_ms % (WINDOW_S * 1000) == 0  # tumbling: aligned, no overlap


async def test_pipeline_traffic_reaches_the_metrics(
    pipeline: Pipeline, stats_agent: ServeProcess, client: InferenceClient
) -> None:
    """Requests through the router and worker processes: the windows count every answer."""
    s: Settings = pipeline.settings
    # Let the telemetry of earlier traffic go out (one interval and a margin), then start
    # on a window boundary: windows from there on hold this test's answers only.
    await asyncio.sleep(s.telemetry_interval_ms / 1000 + 0.5)
    now = time.time()
    first_window_ms = math.ceil(now / WINDOW_S) * WINDOW_S * 1000
    await asyncio.sleep(first_window_ms / 1000 - now)
    n_normal, n_batch = 60, 40
    requests = [
        {"id": uuid.uuid4().hex, "model": "digits", "priority": prio,
         "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                     "data": pipeline.x[i].tolist()}]}
        for i, prio in enumerate(["normal"] * n_normal + ["batch"] * n_batch)
    ]
    responses = await client.infer_many(requests, wait_timeout_ms=60_000)
    assert all(r.status == "ok" for r in responses)
    charged = sum(r.cost_usd or 0.0 for r in responses)

    def mine(rs: list[WindowStats]) -> list[WindowStats]:
        return [r for r in rs if r.model == "digits" and r.window_start_ms >= first_window_ms]

    def complete(rs: list[WindowStats]) -> bool:
        return sum(r.count for r in mine(rs) if r.priority == ALL_PRIORITIES) >= 100

    async with MetricsFeed(s, pipeline.bootstrap) as feed:
        records = mine(await _collect(feed, complete, stats_agent))
    whole = [r for r in records if r.priority == ALL_PRIORITIES]
    assert sum(r.count for r in whole) == sum(r.ok for r in whole) == 100
    assert sum(r.ok for r in records if r.priority == "normal") == n_normal
    assert sum(r.ok for r in records if r.priority == "batch") == n_batch
    assert sum(r.charged_usd for r in whole) == pytest.approx(charged, rel=1e-6)
    busy = [r for r in whole if r.ok]
    for r in busy:
        assert r.p50_ms is not None and r.p99_ms is not None and 0 < r.p50_ms <= r.p99_ms
        assert r.mean_batch_size is not None and r.mean_batch_size >= 1
        assert r.workers == ["it-worker"] and r.execution_providers
        assert r.total_cost_usd >= r.compute_cost_usd > 0
        assert r.utilization is not None and 0 < r.utilization <= 1
    # Each answered row passed through the classifier once: the class histogram agrees.
    rows = sum(sum(r.outputs.counts) for r in whole if isinstance(r.outputs, ClassCounts))
    assert rows == 100
