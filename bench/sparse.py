"""A digits bulk job alone and beside a sparse interactive stream.

Bulk work fills idle capacity: a worker holds it back only while interactive
traffic flows (``FLOW_MIN_ARRIVALS`` requests within ``RECENT_S``, see
:mod:`pipeline.scheduler`). One high-priority request every ``SPARSE_INTERVAL_S``,
further apart than that, is a fleet that is almost idle: its requests are served
as they come and the job should keep nearly all of its rate. The job runs alone,
beside the stream, beside it again and alone again, so that drift of the shared
machine falls on both sides alike; the stream's latencies are reported beside.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.suite import QUIET_POOL_S, Plan, pooled_jobs, step, timed_job
from pipeline.client import InferenceClient
from pipeline.codec import encode_list
from pipeline.scheduler import RECENT_S
from pipeline.settings import Settings
from pipeline.tasks import cancel_and_wait

# Between two requests of the stream: longer than RECENT_S, so each arrives alone.
SPARSE_INTERVAL_S = RECENT_S + 0.5
# A full plan's job runs about this long alone, to span several of the stream's requests.
JOB_S = 6.0
# How long one of the stream's requests may take before it counts as unanswered.
ANSWER_TIMEOUT_S = 30.0


async def sparse_beside_job(plan: Plan, s: Settings, bootstrap: str,
                            pids: dict[str, int | None], x: Any,
                            rows_per_s: float) -> dict[str, Any]:
    """The job's rate alone and beside the stream, and the stream's latencies.

    ``rows_per_s`` is the job's rate measured earlier, to size the job at
    about ``JOB_S`` seconds alone.
    """
    n = 2_000 if plan.quick else max(int(rows_per_s * JOB_S), 10_000)
    lines = [orjson.dumps({"input": x[i % len(x)].tolist()}) + b"\n" for i in range(n)]
    runs: dict[str, list[dict[str, Any]]] = {"alone": [], "beside": []}
    answers: list[tuple[str, float]] = []  # (status, ms) of the stream's requests
    await asyncio.sleep(QUIET_POOL_S)
    with tempfile.TemporaryDirectory(prefix="bench-sparse-") as tmp:
        async with InferenceClient(s, bootstrap_servers=bootstrap) as client:
            for i, way in enumerate(("alone", "beside", "beside", "alone")):
                step(f"pipeline digits bulk job {way}: {n} rows"
                     + (f", one high request every {SPARSE_INTERVAL_S:.1f}s"
                        if way == "beside" else ""))
                job_task = asyncio.create_task(
                    timed_job(s, bootstrap, Path(tmp), f"sparse-{i}", lines, pids,
                              model="digits"))
                stream = (asyncio.create_task(_stream(client, x, job_task, answers))
                          if way == "beside" else None)
                try:
                    job = await job_task
                    if stream is not None:
                        # Its last request (sent before the job ended) is answered too.
                        await asyncio.wait_for(stream, SPARSE_INTERVAL_S + ANSWER_TIMEOUT_S)
                finally:
                    if stream is not None and not stream.done():
                        await cancel_and_wait(stream)
                step(f"    {job['throughput_rps']:,.0f} rows/s, ok {job['ok_share']:.1%}")
                runs[way].append(job)
                await asyncio.sleep(QUIET_POOL_S)
    out: dict[str, Any] = {"rows": n, "interval_s": SPARSE_INTERVAL_S,
                           **{way: pooled_jobs(done) for way, done in runs.items()}}
    out["ratio"] = out["beside"]["throughput_rps"] / out["alone"]["throughput_rps"]
    ok_ms = [ms for status, ms in answers if status == "ok"]
    out["stream"] = {"requests": len(answers), "ok": len(ok_ms),
                     "p50_ms": float(np.median(ok_ms)) if ok_ms else float("nan"),
                     "max_ms": max(ok_ms, default=float("nan"))}
    return out


async def _stream(client: InferenceClient, x: Any, job: asyncio.Task[Any],
                  answers: list[tuple[str, float]]) -> None:
    """One high-priority digits request every SPARSE_INTERVAL_S until ``job`` is done;
    each one's status and latency (submit to answer, ms) appended to ``answers``."""
    i = 0
    while not job.done():
        if i:
            await asyncio.sleep(SPARSE_INTERVAL_S)
            if job.done():
                return
        t0 = time.perf_counter()
        fut = await client.submit({
            "id": f"sparse-{uuid.uuid4().hex}", "model": "digits", "priority": "high",
            "inputs": [encode_list("input", x[i % len(x): i % len(x) + 1])]})
        try:
            response = await asyncio.wait_for(fut, ANSWER_TIMEOUT_S)
        except TimeoutError:
            answers.append(("no_response", float("nan")))
        else:
            answers.append((response.status, (time.perf_counter() - t0) * 1000))
        i += 1
