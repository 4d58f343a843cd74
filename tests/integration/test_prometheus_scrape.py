"""A real Prometheus server scrapes the worker's /metrics; the series come back through its API.

Prometheus is the Debian package ``prometheus`` (``.ci/run`` installs it): the
test fails when the binary is missing rather than skipping, because a skipped
scrape test would say nothing about whether the exposition is scrapeable.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.broker import free_port
from pipeline.client import InferenceClient
from pipeline.metrics import LATENCY_BUCKETS_S
from tests.integration.conftest import Pipeline

JOB = "inferline-worker"
REPO = Path(__file__).resolve().parents[2]
RECORDING_RULES = REPO / "deploy" / "prometheus" / "recording.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "inferline.json"
SENT = 40


class PromServer:
    """A Prometheus process on a free loopback port with its storage in a temp dir."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            f"rule_files: ['{RECORDING_RULES}']\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            "    scrape_interval: 1s\n"
            "    scrape_timeout: 900ms\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            return json.loads(resp.read()) if path.startswith("/api/") else resp.status

    async def get(self, path: str) -> Any:
        """GET a path of the HTTP API off the event loop (decoded JSON for /api/)."""
        return await asyncio.to_thread(self._get, path)

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query."""
        body = await self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def scalar(self, promql: str) -> float:
        """The single value of a query; 0.0 when the vector is empty (no series yet)."""
        result = await self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else 0.0

    async def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if await self.get("/-/ready") == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after {timeout_s}s:\n{self.log_tail()}")
            await asyncio.sleep(0.2)

    async def wait_scrape_after(self, t: float, timeout_s: float = 30) -> float:
        """Wait for a successful scrape of the worker begun after Unix time ``t``; its time."""
        deadline = time.monotonic() + timeout_s
        while True:
            # timestamp() of a plain selector gives the sample's own time, the start of
            # the scrape (of anything else, the evaluation time).
            up = f'up{{job="{JOB}"}}'
            scraped = await self.scalar(f"timestamp({up})")
            if scraped > t and await self.scalar(up) == 1:
                return scraped
            if time.monotonic() > deadline:
                targets = await self.get("/api/v1/targets")
                pytest.fail(f"no scrape after {t}: {targets}\n{self.log_tail()}")
            await asyncio.sleep(0.25)


@pytest.fixture
def prometheus_bin() -> str:
    """Path of the prometheus binary; the test fails without it."""
    found = shutil.which("prometheus") or next(
        (p for p in ("/usr/bin/prometheus", "/usr/local/bin/prometheus") if Path(p).exists()),
        None,
    )
    if found is None:
        pytest.fail("prometheus is required (apt-get install -y prometheus)", pytrace=False)
    return found


@pytest.fixture
def prom(
    prometheus_bin: str, pipeline: Pipeline, tmp_path: Path
) -> Iterator[PromServer]:
    """Prometheus scraping the session worker's /metrics every second."""
    ws = pipeline.worker.settings
    assert ws.metrics_port, "the session worker serves no metrics"
    server = PromServer(prometheus_bin, tmp_path, f"{ws.metrics_host}:{ws.metrics_port}")
    try:
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"prometheus exited with {code}:\n{server.log_tail()}"


def _sel(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


async def test_prometheus_scrapes_worker_series(
    prom: PromServer, pipeline: Pipeline, client: InferenceClient
) -> None:
    await prom.wait_ready()
    sel = _sel(model="digits", priority="batch", pool="default", job=JOB)
    ok_sel = _sel(model="digits", priority="batch", status="ok", pool="default", job=JOB)
    model_sel = _sel(model="digits", job=JOB)
    queries = {
        "ok": f"sum(inferline_requests_total{ok_sel})",
        "count": f"sum(inferline_request_duration_seconds_count{sel})",
        "sum": f"sum(inferline_request_duration_seconds_sum{sel})",
        "queue": f"sum(inferline_queue_duration_seconds_count{sel})",
        "cost": f"sum(inferline_cost_usd_total{model_sel})",
    }
    x = pipeline.x
    # One request first, so that the series exist in the baseline scrape.
    first = await client.infer("digits", {"input": x[:1]}, priority="batch")
    assert first.status == "ok"
    # Values as of a scrape taken after that: nothing else sends meanwhile.
    t0 = await prom.wait_scrape_after(time.time())
    before = {k: await prom.scalar(q) for k, q in queries.items()}

    responses = await asyncio.gather(*(
        client.infer("digits", {"input": x[i : i + 1]}, priority="batch") for i in range(SENT)
    ))
    assert [r.status for r in responses] == ["ok"] * SENT
    t1 = await prom.wait_scrape_after(time.time())
    after = {k: await prom.scalar(q) for k, q in queries.items()}

    assert after["ok"] - before["ok"] == SENT
    assert after["count"] - before["count"] == SENT
    assert after["queue"] - before["queue"] == SENT
    # The histogram's sum is the sum of the total_ms the responses report (rounded to 1 µs).
    reported_s = sum(r.timing.total_ms for r in responses) / 1000
    assert after["sum"] - before["sum"] == pytest.approx(reported_s, abs=SENT * 1e-6)
    charged = sum(r.cost_usd or 0.0 for r in responses)
    assert charged > 0
    assert after["cost"] - before["cost"] == pytest.approx(charged, rel=1e-9)

    # The median of the test's own requests, from the buckets of the two scrapes: it
    # lies in the bucket of the responses' own median (rank SENT/2).
    def buckets(t: float) -> str:
        return f"sum by (le) (inferline_request_duration_seconds_bucket{sel} @ {t:.3f})"

    p50 = await prom.scalar(f"histogram_quantile(0.5, {buckets(t1)} - {buckets(t0)})")
    assert math.isfinite(p50), p50
    median = sorted(r.timing.total_ms / 1000 for r in responses)[SENT // 2 - 1]
    bounds = (0.0, *LATENCY_BUCKETS_S)
    i = next(i for i, b in enumerate(bounds) if b >= median)
    assert bounds[max(i - 1, 0)] <= p50 <= bounds[i], (p50, median)
    # And the dashboards' form, over a rate, is computable too.
    for name in ("request_duration", "queue_duration"):
        q99 = await prom.scalar(
            "histogram_quantile(0.99, sum by (le) "
            f"(rate(inferline_{name}_seconds_bucket{model_sel}[1m])))"
        )
        assert math.isfinite(q99) and q99 >= 0, (name, q99)

    assert await prom.scalar(f"sum(inferline_batch_size_count{model_sel})") >= 1
    ready = await prom.query(f"inferline_model_ready{model_sel}")
    assert ready and all(r["value"][1] == "1" for r in ready), ready
    assert {r["metric"]["pool"] for r in ready} == {"default"}
    assert await prom.scalar(f"inferline_worker_ready{_sel(job=JOB)}") == 1

    # The deployment's recording rules, evaluated by this server on the scraped series.
    await _wait_for(prom, 'model_priority_status:inferline_requests:rate1m'
                          '{model="digits",priority="batch",status="ok"} > 0')
    await _wait_for(prom, 'model_priority:inferline_request_duration_seconds:p99_5m'
                          '{model="digits",priority="batch"} > 0')
    await _wait_for(prom, 'pool:inferline_workers_ready:sum{pool="default"} == 1')

    # Every query of the Grafana dashboard evaluates; those on worker series have data.
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    empty = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"].replace("$__rate_interval", "1m")
            expr = re.sub(r"\$\w+", ".*", expr)
            if not await prom.query(expr):
                empty.append((panel["title"], target["legendFormat"]))
    # Only the router's series (no router is scraped here) and the worker's dead letters
    # (none, unless an earlier test of the session sent a bad record) may be missing.
    assert set(empty) <= {
        ("Routed / s and dead-lettered / s", "routed {{model}} {{priority}}"),
        ("Routed / s and dead-lettered / s", "dlq {{code}}"),
    }, empty


async def _wait_for(prom: PromServer, promql: str, timeout_s: float = 20) -> None:
    """Wait until ``promql`` returns a series."""
    deadline = time.monotonic() + timeout_s
    while not await prom.query(promql):
        if time.monotonic() > deadline:
            pytest.fail(f"nothing for {promql} after {timeout_s}s:\n{prom.log_tail()}")
        await asyncio.sleep(0.5)
