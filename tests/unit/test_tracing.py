"""pipeline.tracing: spans exported over OTLP/HTTP to a real receiver, under the request's trace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.settings import Settings
from pipeline.tracing import Tracing
from tests.otlp_collector import OtlpCollector

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
T0 = 1_700_000_000_000.0  # epoch ms


def _settings(tmp_path: Path, endpoint: str | None) -> Settings:
    return Settings(bootstrap_servers="127.0.0.1:1", model_dir=tmp_path, worker_id="w-1",
                    otlp_endpoint=endpoint)


async def test_spans_hang_off_the_requests_traceparent(tmp_path: Path) -> None:
    with OtlpCollector() as collector:
        router = Tracing.from_settings(_settings(tmp_path, collector.endpoint), "router")
        worker = Tracing.from_settings(_settings(tmp_path, collector.endpoint), "worker")
        assert router is not None and worker is not None
        await router.start()
        await worker.start()
        headers = [("traceparent", TRACEPARENT.encode()), ("other", b"x")]
        router.route_span(headers, T0, T0 + 2, request_id="r1", model="digits",
                          priority="high")
        worker.worker_spans(
            headers, ts_ms=T0, received_ms=T0 + 5, compute_start_ms=T0 + 7, compute_ms=1.5,
            end_ms=T0 + 9, request_id="r1", model="digits", version="1", priority="high",
            batch_rows=8,
        )
        # A request without trace context is not traced.
        worker.worker_spans(
            [], ts_ms=T0, received_ms=T0 + 5, compute_start_ms=T0 + 7, compute_ms=1.5,
            end_ms=T0 + 9, request_id="r2", model="digits", version="1", priority="high",
            batch_rows=8,
        )
        await router.stop()
        await worker.stop()
        await worker.stop()  # idempotent
        spans = {s.name: s for s in collector.received()}

    assert sorted(spans) == ["batch", "compute", "queue", "route"]
    assert {s.trace_id for s in spans.values()} == {TRACE_ID}
    for name in ("route", "queue", "batch"):
        assert spans[name].parent_span_id == PARENT_ID
    assert spans["compute"].parent_span_id == spans["batch"].span_id
    ms = 1_000_000
    assert (spans["route"].start_ns, spans["route"].end_ns) == (T0 * ms, (T0 + 2) * ms)
    assert (spans["queue"].start_ns, spans["queue"].end_ns) == (T0 * ms, (T0 + 5) * ms)
    assert (spans["batch"].start_ns, spans["batch"].end_ns) == ((T0 + 5) * ms, (T0 + 9) * ms)
    assert (spans["compute"].start_ns, spans["compute"].end_ns) == (
        (T0 + 7) * ms, (T0 + 8.5) * ms
    )
    assert spans["batch"].attributes["inferline.batch_rows"] == 8
    assert spans["queue"].attributes["inferline.request_id"] == "r1"
    assert spans["route"].service == "inferline-router"
    assert spans["compute"].service == "inferline-worker"


async def test_unsampled_requests_are_not_exported(tmp_path: Path) -> None:
    with OtlpCollector() as collector:
        tracing = Tracing.from_settings(_settings(tmp_path, collector.endpoint), "worker")
        assert tracing is not None
        await tracing.start()
        tracing.route_span([("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00".encode())],
                           T0, T0 + 1, request_id="r", model="m", priority="normal")
        tracing.route_span([("traceparent", TRACEPARENT.encode())], T0, T0 + 1,
                           request_id="s", model="m", priority="normal")
        await tracing.stop()
        spans = collector.received()
    assert [s.attributes["inferline.request_id"] for s in spans] == ["s"]


def test_disabled_tracing_imports_no_opentelemetry(tmp_path: Path) -> None:
    # A fresh interpreter: this one may have imported the SDK for other tests.
    code = (
        "import sys\n"
        "from pipeline.settings import Settings\n"
        "from pipeline.tracing import Tracing\n"
        "import agents.worker, agents.router\n"
        f"s = Settings(bootstrap_servers='127.0.0.1:1', model_dir={str(tmp_path)!r})\n"
        "assert Tracing.from_settings(s, 'worker') is None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "print(loaded)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
