"""A bulk job on the batch lane yields to interactive traffic on the same worker.

The job runs as users run it, an ``inferline batch run`` process of its own, in
rounds interleaved with rounds of interactive traffic alone, so that drift of the
shared machine (and of the embedded broker, whose fetches grow dearer as its
partitions fill) falls on both sides alike.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest

from pipeline.batchio import read_records
from pipeline.batchjob import JobStatus, state_file
from pipeline.client import InferenceClient
from pipeline.codec import encode_list
from tests.integration.conftest import ROOT, Pipeline, cli_env

pytestmark = pytest.mark.broker

ROUNDS = 3
INTERACTIVE = 300  # requests per round, at RATE_PER_S
RATE_PER_S = 100
JOB_ROWS = 8_000


async def interactive(client: InferenceClient, p: Pipeline, n: int, rate: float) -> list[float]:
    """``n`` high-priority requests, open loop at ``rate``/s; their server-side latencies."""
    futures = []
    for i in range(n):
        futures.append(await client.submit({
            "id": f"ia-{uuid.uuid4().hex}", "model": "digits", "priority": "high",
            "inputs": [encode_list("input", p.x[i % len(p.x): i % len(p.x) + 1])],
        }))
        await asyncio.sleep(1 / rate)
    responses = await asyncio.wait_for(asyncio.gather(*futures), 120)
    assert all(r.status == "ok" for r in responses), {r.status for r in responses}
    t = [r.timing for r in responses if r.timing is not None]
    assert len(t) == n
    return [x.total_ms for x in t]


def _done(p: Pipeline, job_id: str) -> int:
    try:
        return JobStatus.from_json(state_file(p.settings, job_id).read_bytes()).done
    except (OSError, ValueError):
        return 0  # not written yet, or caught mid-replace


async def test_interactive_p99_stays_near_alone_beside_a_batch_job(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    p = pipeline
    src = tmp_path / "bulk.jsonl"
    src.write_bytes(b"".join(
        orjson.dumps({"input": p.x[i % len(p.x)].tolist()}) + b"\n" for i in range(JOB_ROWS)
    ))
    env = cli_env(p)
    alone: list[list[float]] = []
    together: list[list[float]] = []
    during: list[int] = []
    bulk_p50: list[float] = []
    async with InferenceClient(p.settings, bootstrap_servers=p.bootstrap) as client:
        await interactive(client, p, 50, RATE_PER_S)  # warm the path
        for r in range(ROUNDS):
            alone.append(await interactive(client, p, INTERACTIVE, RATE_PER_S))
            job_id = f"yield-{r}-{uuid.uuid4().hex[:6]}"
            out = tmp_path / f"{job_id}.jsonl"
            # The CLI's defaults (max_in_flight 512): the job pushes as hard as users' do.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agents.cli", "batch", "run", str(src),
                "--model", "digits", "--out", str(out), "--job-id", job_id,
                env=env, cwd=str(ROOT),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            try:
                while _done(p, job_id) < 500:
                    assert proc.returncode is None, (await proc.communicate())[0].decode()
                    await asyncio.sleep(0.05)
                before = _done(p, job_id)
                together.append(await interactive(client, p, INTERACTIVE, RATE_PER_S))
                during.append(_done(p, job_id) - before)
                output, _ = await asyncio.wait_for(proc.communicate(), 300)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 0, output.decode(errors="replace")
            rows = read_records(out)
            assert len(rows) == JOB_ROWS and all(x["status"] == "ok" for x in rows)
            bulk_p50.append(float(np.median([x["latency_ms"] for x in rows])))

    p99_alone = [float(np.percentile(x, 99)) for x in alone]
    p99_together = [float(np.percentile(x, 99)) for x in together]
    p50_alone = [float(np.percentile(x, 50)) for x in alone]
    p50_together = [float(np.percentile(x, 50)) for x in together]
    print(f"interactive p99 by round, alone {[round(x, 1) for x in p99_alone]} ms, beside "
          f"the job {[round(x, 1) for x in p99_together]} ms; p50 alone "
          f"{[round(x, 1) for x in p50_alone]}, beside {[round(x, 1) for x in p50_together]}; "
          f"bulk rows answered meanwhile {during}; bulk rows' p50 "
          f"{[round(x) for x in bulk_p50]} ms")
    # The job really ran beside the interactive traffic, every round.
    assert min(during) >= 100, during
    # Noise: how far apart the rounds without the job land (they drift up as the
    # embedded broker's partitions fill, and the rounds interleave so that the drift
    # falls on both sides). Three rounds can land close together by chance (a spread
    # of 1.6 ms in one CI run), so the allowance is the larger of that spread and half
    # the median round. On two cores shared by the broker, router, worker, the job's
    # client and this test, the job's rows packed 16 to a request (its CLI's default)
    # raised a round's p99 by a median of 1.6 ms over 18 rounds here (5.1 ms with each
    # row alone), where consecutive rounds without the job differ by about 4.5 ms.
    # Without the yielding the p99 doubled.
    noise_ms = max(p99_alone) - min(p99_alone)
    median_alone, median_together = np.median(p99_alone), np.median(p99_together)
    assert median_together <= median_alone + max(noise_ms, 0.5 * median_alone), (
        p99_alone, p99_together)
    # Interactive requests are served ahead of the job's rows.
    assert median_together < np.median(bulk_p50), (p99_together, bulk_p50)
