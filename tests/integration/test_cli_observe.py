"""`inferline cost` and `inferline top --once` against the broker, on the stats agent's records."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
import uuid

import pytest

from agents.cli_observe import cost_rows, lane_lag
from agents.processes import ServeProcess
from pipeline.client import InferenceClient
from pipeline.metricsfeed import MetricsFeed
from pipeline.rollup import ALL_PRIORITIES, WindowStats
from pipeline.topics import ensure_topics, lane_topics
from tests.integration.conftest import Pipeline, produce_batches

pytestmark = pytest.mark.broker

HEALTH_STATES = {"healthy", "degraded-model", "degraded-infra", "down", "-"}


async def _inferline(pipeline: Pipeline, *args: str) -> tuple[int, str]:
    env = {**os.environ, **pipeline.settings.model_copy(
        update={"bootstrap_servers": pipeline.bootstrap}).to_env(),
        # Wide enough that rich never wraps a table cell onto a second line.
        "COLUMNS": "250"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode()


async def _windows_with_traffic(
    pipeline: Pipeline, client: InferenceClient, stats: ServeProcess, n: int
) -> list[WindowStats]:
    """Send ``n`` digits requests, then read the metrics until they are all counted."""
    start_ms = time.time() * 1000
    requests = [
        {"id": uuid.uuid4().hex, "model": "digits",
         "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                     "data": pipeline.x[i % len(pipeline.x)].tolist()}]}
        for i in range(n)
    ]
    responses = await client.infer_many(requests, wait_timeout_ms=60_000)
    assert all(r.status == "ok" for r in responses)
    deadline = time.monotonic() + 90
    async with MetricsFeed(pipeline.settings, pipeline.bootstrap) as feed:
        records = await feed.catch_up()
        # Windows that end after the traffic's last telemetry interval are closed.
        while not any(r.model == "digits" and r.window_start_ms > start_ms + 3000
                      for r in records):
            if stats.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"no metrics after the traffic:\n{stats.tail()}")
            records += await feed.poll(500)
    return records


def _row(output: str, model: str, version: str | None = "1") -> list[str]:
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if cells and cells[0] == model and (version is None or cells[1:2] == [version]):
            return cells
    raise AssertionError(f"no row for {model} in:\n{output}")


def _usd(cell: str) -> float:
    return float(cell.lstrip("$").replace(",", ""))


async def test_cost_report(
    pipeline: Pipeline, stats_agent: ServeProcess, client: InferenceClient
) -> None:
    records = await _windows_with_traffic(pipeline, client, stats_agent, 50)
    code, out = await _inferline(pipeline, "cost")
    assert code == 0, out
    # The command read at least what this test read; no traffic has run since, so the
    # request counts are the same and the costs at least as high.
    mine = {r.model: r for r in cost_rows(records)}["digits"]
    cells = _row(out, "digits")
    model, version, requests, ok, compute, idle, total, per_1000, util, _windows = cells
    assert (model, version) == ("digits", "1")
    assert int(requests.replace(",", "")) == mine.requests >= 50
    assert int(ok.replace(",", "")) == mine.ok
    assert _usd(total) == pytest.approx(_usd(compute) + _usd(idle), abs=2e-6)
    assert _usd(total) >= mine.total_usd - 1e-6 > 0
    assert _usd(compute) == pytest.approx(mine.compute_usd, abs=1e-6)  # idle windows add 0
    assert _usd(per_1000) == pytest.approx(1000 * _usd(total) / mine.ok, rel=0.01, abs=2e-6)
    assert 0 < float(util.rstrip("%")) <= 100
    assert _row(out, "all", None)[0] == "all"


async def test_cost_without_a_cluster_says_so(pipeline: Pipeline) -> None:
    env = {**os.environ, **pipeline.settings.to_env()}
    env.pop("INFERLINE_BOOTSTRAP_SERVERS", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents.cli", "cost", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert b"INFERLINE_BOOTSTRAP_SERVERS" in out


async def test_top_once(
    pipeline: Pipeline, stats_agent: ServeProcess, client: InferenceClient
) -> None:
    await _windows_with_traffic(pipeline, client, stats_agent, 30)
    stop = asyncio.Event()

    async def steady() -> int:
        sent = 0
        while not stop.is_set():
            resp = await client.infer("digits", {"input": pipeline.x[sent % 10: sent % 10 + 1]})
            assert resp.status == "ok"
            sent += 1
            await asyncio.sleep(0.02)
        return sent

    traffic = asyncio.create_task(steady())
    try:
        # Long enough for a whole window of steady traffic to close (window, grace, margin).
        await asyncio.sleep(7.0)
        code, out = await _inferline(pipeline, "top", "--once")
    finally:
        stop.set()
        sent = await traffic
    assert code == 0, out
    print(out)
    assert sent > 50
    cells = _row(out, "digits")
    (model, version, rps, p50, p99, errors, lag, batch, per_1000, util, workers, health,
     _window) = cells
    assert (model, version, workers) == ("digits", "1", "1")
    assert int(lag.replace(",", "")) >= 0
    assert health in HEALTH_STATES
    # The latest closed window had traffic in it.
    assert float(rps) > 0 and 0 < float(p50) <= float(p99) and float(batch) >= 1
    assert _usd(per_1000) > 0 and float(util.rstrip("%")) > 0
    assert errors == "0%"
    # The frame shows a window the stats agent published.
    async with MetricsFeed(pipeline.settings, pipeline.bootstrap) as feed:
        after = [r for r in await feed.catch_up()
                 if r.model == "digits" and r.priority == ALL_PRIORITIES]
    shown = {
        (f"{r.throughput_rps:.1f}", "-" if r.p50_ms is None else f"{r.p50_ms:.1f}",
         "-" if r.p99_ms is None else f"{r.p99_ms:.1f}",
         "-" if r.mean_batch_size is None else f"{r.mean_batch_size:.1f}")
        for r in after
    }
    assert (rps, p50, p99, batch) in shown
    if health == "-":
        assert "pipeline.health is not available" in out


async def test_lane_lag_counts_a_backlog_inside_one_batch(pipeline: Pipeline) -> None:
    # Lanes of their own that no worker group reads: their whole content is lag, the
    # last batch's records included (the embedded broker lists the end short of them).
    s = pipeline.settings.model_copy(update={"topic_prefix": f"lag-{uuid.uuid4().hex[:8]}"})
    await ensure_topics(s, pipeline.bootstrap, lane_topics(s, ["digits"]))
    await produce_batches(pipeline.bootstrap, s.lane_topic("digits", "batch"))
    assert await lane_lag(s, pipeline.bootstrap, ["digits"]) == {"digits": 111}
