"""``inferline status`` tells a drifted model from a killed worker: real broker, real processes.

Two models on one pipeline, each with a worker of its own pool: ``digits`` and
``digits2`` (the same network under a second name, preferring CUDA). Both get
held-out traffic first (their drift references); then ``digits`` gets only images
of one digit (its outputs drift) while ``digits2`` keeps the held-out mix; then
the ``digits2`` worker is SIGKILLed. The status must blame the model for
``digits`` and the infrastructure for ``digits2``, never the other way round; a
stats process exports the same verdicts as gauges for the alert rules.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents.cli_status import StatusReport, collect_status, format_table
from agents.processes import ServeProcess
from agents.serve import prepare_topics
from pipeline.broker import free_port
from pipeline.client import InferenceClient
from pipeline.drift import ClassHistogram, load_references
from pipeline.modelstore import load_heldout, render_registry
from pipeline.registry import Registry
from pipeline.session import cuda_unavailable_reason
from pipeline.settings import Settings

pytestmark = pytest.mark.timeout(240)

READY_TIMEOUT_MS = 120_000
ROWS_PER_REQUEST = 20
HEARTBEAT_TIMEOUT_MS = 2_000


def _registry(model_dir: Path, out: Path) -> Path:
    """The session's digits plus ``digits2``: same file, pool ``aux``, prefers CUDA."""
    digits = Registry.load(model_dir / "registry.toml").entries["digits"]
    twin = digits.model_copy(update={
        "name": "digits2",
        "versions": tuple(
            v.model_copy(update={"name": "digits2", "pool": "aux", "execution_provider": "cuda"})
            for v in digits.versions
        ),
    })
    path = out / "registry.toml"
    path.write_text(render_registry([digits, twin], out), encoding="utf-8")
    return path


def _requests(model: str, x: np.ndarray[Any, Any], tag: str) -> list[dict[str, Any]]:
    out = []
    for i in range(0, len(x), ROWS_PER_REQUEST):
        rows = x[i:i + ROWS_PER_REQUEST]
        out.append({
            "id": f"{tag}-{uuid.uuid4().hex[:8]}-{i}", "model": model,
            "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.ravel().tolist()}],
        })
    return out


@pytest.fixture
async def health_settings(
    pipeline_settings: Settings, tmp_path: Path
) -> AsyncIterator[Settings]:
    yield pipeline_settings.model_copy(update={
        "topic_prefix": f"health-{uuid.uuid4().hex[:10]}",
        "state_dir": tmp_path / "state",
        "registry": _registry(pipeline_settings.model_dir, tmp_path),
        "session_timeout_ms": 3_000,
        "rebalance_timeout_ms": 3_000,
        "heartbeat_interval_ms": 300,
        "metrics_port": 0,
        "telemetry_interval_ms": 200,
        "control_heartbeat_ms": 200,
        "health_heartbeat_timeout_ms": HEARTBEAT_TIMEOUT_MS,
        "health_window_s": 30.0,
        "drift_reference_rows": 300,
    })


def _samples(port: int, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one series on a process's /metrics, by their sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        tuple(sorted(smp.labels.items())): smp.value
        for fam in text_string_to_metric_families(text) for smp in fam.samples
        if smp.name == name
    }


async def _gauge(port: int, name: str, labels: dict[str, str], timeout_s: float = 30) -> float:
    """A gauge's value once the process exports it (polls: it is set every second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for key, value in (await asyncio.to_thread(_samples, port, name)).items():
            if labels.items() <= dict(key).items():
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} not exported on :{port} in {timeout_s} s")
        await asyncio.sleep(0.5)


async def _status(s: Settings, broker: str) -> StatusReport:
    started = time.monotonic()
    report = await collect_status(s, broker)
    print(f"[health] status read {report.telemetry_records} telemetry records in "
          f"{time.monotonic() - started:.1f} s\n{format_table(report)}")
    assert not report.errors, report.errors
    return report


async def test_status_tells_drifted_model_from_killed_worker(
    health_settings: Settings, broker: str
) -> None:
    s = health_settings
    await prepare_topics(s, broker, ["digits", "digits2"])
    logs = s.state_dir / "logs"
    router = ServeProcess(s, broker, "router", worker_id="h-router", log_path=logs / "r.log")
    main = ServeProcess(s, broker, "worker", worker_id="h-main", log_path=logs / "main.log")
    aux_port, stats_port = free_port(), free_port()
    aux = ServeProcess(s.model_copy(update={"pool": "aux", "metrics_port": aux_port}), broker,
                       "worker", worker_id="h-aux", log_path=logs / "aux.log")
    # The stats process judges health continuously and exports the drift gauges.
    stats = ServeProcess(s.model_copy(update={"metrics_port": stats_port}), broker, "stats",
                         worker_id="h-stats", log_path=logs / "stats.log")
    procs = [router, main, aux, stats]
    x, y = load_heldout(s.model_dir)

    def logs_tail() -> str:
        return "\n".join(f"--- {p.settings.worker_id} rc={p.returncode}\n{p.tail(20)}"
                         for p in procs)

    try:
        for p in procs:
            await p.start()
        async with InferenceClient(s, bootstrap_servers=broker) as client:
            for model in ("digits", "digits2"):
                await client.wait_until_served(model, {"input": x[:1]},
                                               timeout_ms=READY_TIMEOUT_MS)
            # References: the first 300 rows of each version, the held-out mix.
            normal = x[:400]
            for model in ("digits", "digits2"):
                resps = await client.infer_many(_requests(model, normal, "ref"))
                assert {r.status for r in resps} == {"ok"}, resps[:3]
            await asyncio.sleep(1.0)  # past a few telemetry intervals: references close
            # digits now sees only images of a 0; digits2 the same mix as before.
            zeros = np.resize(x[y == 0], (400, 64))
            assert len(x[y == 0]) >= 10
            for model, rows in (("digits", zeros), ("digits2", normal)):
                resps = await client.infer_many(_requests(model, rows, "drift"))
                assert {r.status for r in resps} == {"ok"}, resps[:3]
                if model == "digits":
                    labels = {int(v) for r in resps for v in r.outputs[0].data}
                    assert labels == {0}, f"the model should call these zeros, got {labels}"
        await asyncio.sleep(1.0)

        before = await _status(s, broker)
        d, d2 = before.healths[("digits", "1")], before.healths[("digits2", "1")]
        assert d.state == "degraded-model", d
        assert d.model and not d.infra
        assert any(r.startswith("model degradation: class histogram PSI=") for r in d.reasons)
        assert d.drift is not None and d.drift.psi is not None and d.drift.psi > 1.0
        assert d.live_workers == ("h-main",)
        assert not d2.model, d2  # same mix as its reference: no drift
        assert d2.drift is not None and d2.drift.psi is not None and d2.drift.psi < 0.2
        assert d2.live_workers == ("h-aux",)
        fallback = [r for r in d2.reasons if "execution provider fallback" in r]
        if cuda_unavailable_reason() is None:
            assert d2.state == "healthy", d2
        else:
            # No usable CUDA here: digits2 runs on CPU against its preference.
            assert d2.state == "degraded-infra", d2
            assert fallback == ["infrastructure: execution provider fallback: digits2:1 "
                                "prefers cuda, worker h-aux runs it on CPUExecutionProvider"]

        # The same verdicts as gauges, for the alert rules.
        cuda_missing = cuda_unavailable_reason() is not None
        assert await _gauge(aux_port, "inferline_execution_provider_fallback",
                            {"model": "digits2"}) == (1.0 if cuda_missing else 0.0)
        psi = await _gauge(stats_port, "inferline_output_drift_psi",
                           {"model": "digits", "version": "1"})
        assert psi > 1.0, psi
        assert await _gauge(stats_port, "inferline_output_drift_psi",
                            {"model": "digits2", "version": "1"}) < 0.2
        assert await _gauge(stats_port, "inferline_model_health",
                            {"model": "digits", "state": "degraded-model"}) == 1.0
        print(f"[health] stats process: digits PSI {psi:.2f}")

        aux.kill(signal.SIGKILL)
        assert aux.proc is not None
        assert await asyncio.wait_for(aux.proc.wait(), 30) == -signal.SIGKILL
        killed_at = time.monotonic()
        await asyncio.sleep(HEARTBEAT_TIMEOUT_MS / 1000 + 0.5)

        after = await _status(s, broker)
        d, d2 = after.healths[("digits", "1")], after.healths[("digits2", "1")]
        assert d.state == "degraded-model" and d.model and not d.infra, d
        assert d2.state == "down" and d2.infra and not d2.model, d2
        missing = [r for r in d2.reasons if "worker h-aux (pool aux) missing" in r]
        assert len(missing) == 1, d2.reasons
        silent_s = float(missing[0].split("no heartbeat for ")[1].split(" s)")[0])
        assert HEARTBEAT_TIMEOUT_MS / 1000 < silent_s <= time.monotonic() - killed_at + 1.0
        assert "infrastructure: no live worker serves digits2:1" in d2.reasons
        assert not any("missing" in r for r in d.reasons)

        # The command itself prints the same verdicts and exits 1 (not all healthy).
        env = {**os.environ, **s.model_copy(update={"bootstrap_servers": broker}).to_env()}
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agents.cli", "status", "--window-s", "30",
            "--save-reference", str(s.state_dir / "refs.json"),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(cli.communicate(), 60)
        text = out.decode()
        print(f"[health] inferline status (rc={cli.returncode}):\n{text}{err.decode()[-2000:]}")
        assert cli.returncode == 1, err.decode()[-2000:]
        lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
        assert "degraded-model" in lines["digits"]
        assert "model degradation: class histogram PSI=" in lines["digits"]
        assert "down" in lines["digits2"]
        assert "worker h-aux (pool aux) missing (no heartbeat for" in text
        # The references it saved are the held-out mix each version saw first.
        refs = load_references(s.state_dir / "refs.json")
        assert set(refs) == {("digits", "1"), ("digits2", "1")}
        for ref in refs.values():
            assert isinstance(ref.summary, ClassHistogram)
            assert ref.summary.rows >= 300
            assert max(ref.summary.counts) / ref.summary.rows < 0.3, ref.summary
        down = 0.0
        for _ in range(20):  # the stats process sees the silence within its next assessments
            down = await _gauge(stats_port, "inferline_model_health",
                                {"model": "digits2", "state": "down"})
            if down == 1.0:
                break
            await asyncio.sleep(0.5)
        assert down == 1.0
        for p in (router, main, stats):
            assert p.returncode is None, logs_tail()
    finally:
        codes = [await p.stop() for p in procs]
        print(f"[health] exit codes {codes}")
