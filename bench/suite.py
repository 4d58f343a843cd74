"""What the suite's measurements share: the plan, progress lines, raw ONNX Runtime, fleets.

``bench/__main__.py`` runs the suite; ``bench/minilm_cycles.py`` runs minilm's
cycles against raw ONNX Runtime; both take their pieces from here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agents.processes import ServeProcess
from agents.serve import prepare_topics
from bench.burst import BenchError, CpuMeter, percentile
from pipeline.batchio import read_records
from pipeline.batchjob import BatchJob, BatchJobConfig, job_client
from pipeline.client import InferenceClient
from pipeline.errors import InferlineError
from pipeline.modelstore import load_heldout
from pipeline.registry import ModelVersion
from pipeline.scheduler import RECENT_S
from pipeline.session import ModelSession
from pipeline.settings import Settings
from pipeline.text import sample_texts

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
LOAD_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
QUICK_FRACTIONS = (0.25, 0.5, 0.8, 1.1)
# Interactive traffic flows until RECENT_S after the next-to-last request arrived, and
# bulk batches are spaced out while it flows: a bulk job starts this long after an
# interactive measurement, on a quiet pool, as it would overnight.
QUIET_POOL_S = RECENT_S + 0.5
# Seconds of a full plan's minilm run at raw ONNX Runtime's rate (Plan.sized_for).
MINILM_RUN_S = 10.0


@dataclass(frozen=True)
class Plan:
    """Sizes of every measurement."""

    quick: bool
    digits_requests: int
    minilm_requests: int
    minilm_cycles: int
    dedicated_requests: int
    dedicated_cycles: int
    naive_requests: int
    hop_records: int
    warmup: int
    ort_seconds: float
    concurrency: int
    closed_seconds: float
    open_seconds: float
    fractions: tuple[float, ...]
    intra_op_threads: int
    instances: int
    pipeline_threads: int

    @classmethod
    def of(cls, args: argparse.Namespace) -> Plan:
        """The plan for the command line's options."""
        q = args.quick
        threads = args.intra_op_threads or (os.cpu_count() or 1)
        instances = args.instances or threads
        return cls(
            quick=q, digits_requests=4000 if q else 20_000,
            # minilm runs of about MINILM_RUN_S each (see sized_for): the host's fast and
            # slow spells last seconds.
            minilm_requests=300 if q else 5000,
            minilm_cycles=1 if q else 3,
            # The dedicated-core runs compute on half the cores: half the texts for
            # runs of about the same length.
            dedicated_requests=150 if q else 2500,
            dedicated_cycles=1 if q else 3,
            naive_requests=1000 if q else 5000, hop_records=4000 if q else 20_000,
            warmup=400 if q else 2000, ort_seconds=0.6 if q else 3.0,
            concurrency=args.concurrency, closed_seconds=3.0 if q else 10.0,
            open_seconds=2.0 if q else 5.0, fractions=QUICK_FRACTIONS if q else LOAD_FRACTIONS,
            intra_op_threads=threads,
            # The worker runs this many batches at once, each on pipeline_threads threads.
            instances=instances, pipeline_threads=max(threads // instances, 1),
        )

    def sized_for(self, minilm_rows_per_s: float) -> Plan:
        """This plan with minilm runs of about ``MINILM_RUN_S`` at raw's measured rate.

        A run also pays the pipeline's depth once, the first batch's latency before
        any answer and the last answers' delivery, and raw ONNX Runtime's rounds pay
        none: on a faster host a fixed count of texts would be a shorter run and
        charge that more. Never fewer texts than planned; quick plans stay as they are.
        """
        if self.quick:
            return self
        n = max(self.minilm_requests, int(round(minilm_rows_per_s * MINILM_RUN_S, -3)))
        return replace(self, minilm_requests=n,
                       dedicated_requests=max(self.dedicated_requests, n // 2))


def step(msg: str) -> None:
    """One progress line."""
    print(f"[bench] {msg}", flush=True)


# --------------------------------------------------------------------------- compute limit


def raw_onnxruntime(spec: ModelVersion, batch: Any, sizes: tuple[int, ...], min_s: float,
                    threads: int, rounds: int = 3, instances: int = 1) -> dict[str, Any]:
    """Rows/s of ``ModelSession.run`` per batch size: the median of ``rounds`` rounds.

    Each round measures every size for ``min_s / rounds`` seconds, so that a slow
    spell of the shared CPUs hits all sizes alike rather than one of them, and the
    median keeps one lucky spell from electing the "best" size. ``batch(n, offset)``
    gives the inputs; the offset turns, so that batches of texts mix short and long
    ones as the pipeline's batches do. With ``instances`` > 1, that many threads
    call the one session at once (as a worker with that many instances does).
    """
    samples: dict[str, list[float]] = {str(n): [] for n in sizes}
    # This process's CPU seconds and rows per size, over every round: what a row
    # costs the CPUs at the limit, beside what the pipeline spends per row.
    cpu_s = {str(n): 0.0 for n in sizes}
    done = {str(n): 0 for n in sizes}
    with ModelSession(spec, provider="cpu", intra_op_threads=threads) as session:
        session.warmup()
        inputs = {n: [batch(n, k * n) for k in range(12)] for n in sizes}
        for n in sizes:
            session.run(inputs[n][0])

        def spin(n: int, first: int, until: float) -> int:
            runs = 0
            while time.perf_counter() < until or runs < 2:
                session.run(inputs[n][(first + runs * instances) % 12])
                runs += 1
            return runs

        with ThreadPoolExecutor(max_workers=instances) as pool:
            for _ in range(rounds):
                for n in sizes:
                    start, cpu_start = time.perf_counter(), time.process_time()
                    until = start + min_s / rounds
                    runs = sum(pool.map(spin, [n] * instances, range(instances),
                                        [until] * instances))
                    samples[str(n)].append(runs * n / (time.perf_counter() - start))
                    cpu_s[str(n)] += time.process_time() - cpu_start
                    done[str(n)] += runs * n
    per = {k: float(np.median(v)) for k, v in samples.items()}
    best = max(per, key=lambda k: per[k])
    return {"rows_per_s_by_batch_size": per, "best_batch_size": int(best),
            "best_rows_per_s": per[best], "intra_op_threads": threads, "instances": instances,
            "samples": samples, "max_batch_size": spec.max_batch_size,
            "cpu_us_per_row_by_batch_size": {k: 1e6 * cpu_s[k] / done[k] for k in done}}


def digits_batch(x: np.ndarray[Any, Any]) -> Callable[[int, int], dict[str, Any]]:
    """The raw ONNX Runtime input for ``digits``: ``n`` rows of ``x`` from ``offset`` on."""
    def batch(n: int, offset: int) -> dict[str, Any]:
        return {"input": np.ascontiguousarray(x[(np.arange(n) + offset) % len(x)], np.float32)}

    return batch


def minilm_batch(n: int, offset: int) -> dict[str, Any]:
    """``n`` sample texts from ``offset`` on: the raw ONNX Runtime input."""
    return {"text": sample_texts(n, offset=offset)}


def minilm_requests(n: int, tag: str) -> list[dict[str, Any]]:
    """``n`` one-text minilm requests over the sample texts.

    Each asks for its embedding as a base64 buffer (``binary_data_output``), as a
    bulk job does and as a client after throughput would: 384 JSON numbers per
    answer cost the worker, the broker and the client about 50 µs more per text
    (paired 8,000-text bursts: 899 and 906 texts/s with JSON answers, 914 and 935
    with buffers).
    """
    texts = [t.decode() for t in sample_texts(n).tolist()]
    return [{"id": f"{tag}-{i}", "model": "minilm", "inputs": [
        {"name": "text", "shape": [1], "datatype": "BYTES", "data": [texts[i]]}],
        "parameters": {"binary_data_output": True}}
        for i in range(n)]


# --------------------------------------------------------------------------- pipeline


@contextlib.asynccontextmanager
async def fleet(base: Settings, bootstrap: str, models: list[str], logs: Path,
                broker_pid: int | None) -> AsyncIterator[tuple[Settings, dict[str, int | None]]]:
    """A router and a worker process serving ``models``, ready to answer.

    Yields the fleet's settings and the process ids a :class:`CpuMeter` reads
    (this process as ``bench_client``, the broker, the router, the worker).
    """
    s = base.model_copy(update={"topic_prefix": f"bench-suite-{uuid.uuid4().hex[:8]}"})
    await prepare_topics(s, bootstrap, models)
    procs = [ServeProcess(s, bootstrap, role, models=models if role == "worker" else None,
                          worker_id=f"suite-{role}",
                          log_path=logs / f"suite-{role}-{'-'.join(models)}.log")
             for role in ("router", "worker")]
    try:
        for p in procs:
            await p.start()
        async with InferenceClient(s, bootstrap_servers=bootstrap) as client:
            x, _ = load_heldout(s.model_dir)
            probes: dict[str, dict[str, np.ndarray[Any, Any]]] = {
                "digits": {"input": x[:1]}, "minilm": {"text": sample_texts(1)}}
            for model in models:
                try:
                    await client.wait_until_served(model, probes[model], timeout_ms=180_000)
                except InferlineError as exc:
                    tails = "\n".join(f"--- {p.role}:\n{p.tail()}" for p in procs)
                    raise BenchError(f"pipeline not serving {model}: {exc}\n{tails}") from exc
        yield s, {"bench_client": None, "broker": broker_pid,
                  **{p.role: p.proc.pid if p.proc else None for p in procs}}
    finally:
        for p in procs:
            await p.stop()


async def timed_job(s: Settings, bootstrap: str, folder: Path, tag: str, lines: list[bytes],
                     pids: dict[str, int | None], *, model: str = "minilm",
                     rows_per_request: int = BatchJobConfig.rows_per_request) -> dict[str, Any]:
    """One job over ``lines`` (JSON Lines rows): its rate, CPU and rows' p50."""
    cfg = BatchJobConfig(job_id=f"bench-{tag}-{uuid.uuid4().hex[:6]}", model=model,
                         input=folder / f"{tag}-in.jsonl", output=folder / f"{tag}-out.jsonl",
                         rows_per_request=rows_per_request)
    cfg.input.write_bytes(b"".join(lines))
    cpu = CpuMeter(pids)
    async with job_client(s, bootstrap, cfg) as client:
        cpu.start()
        t0 = time.perf_counter()
        st = await BatchJob(s, client, cfg).run()
        seconds = time.perf_counter() - t0
        used, busy = cpu.stop()
    lat = [r["latency_ms"] for r in read_records(cfg.output) if r.get("latency_ms") is not None]
    n = len(lines)
    return {"rows": n, "rows_per_request": rows_per_request, "seconds": seconds,
            "throughput_rps": n / seconds, "ok": st.ok,
            "ok_share": st.ok / n, "state": st.state, "cost_usd": st.cost_usd,
            "p50_ms": percentile(lat, 50),
            "cpu_s": used, "machine_busy_share": busy}


def pooled_jobs(done: list[dict[str, Any]]) -> dict[str, Any]:
    """Several :func:`timed_job` runs as one: their rows over their seconds, each run's
    rate, the ok share, the states and the CPU per process summed."""
    rows, seconds = sum(j["rows"] for j in done), sum(j["seconds"] for j in done)
    cpu: dict[str, float] = {}
    for j in done:
        for name, v in j["cpu_s"].items():
            cpu[name] = cpu.get(name, 0.0) + v
    return {"rows": rows, "seconds": seconds, "throughput_rps": rows / seconds,
            "ok_share": sum(j["ok"] for j in done) / rows,
            "state": ", ".join(sorted({j["state"] for j in done})), "cpu_s": cpu,
            "runs_rps": [j["throughput_rps"] for j in done]}
