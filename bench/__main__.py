"""The benchmark suite: ``python -m bench [--quick]``.

In one run, on this machine, it measures the pipeline against its limits and its
peers and prints each comparison as a ratio of figures taken in the same run:

1. compute limit: raw ONNX Runtime (the pipeline's own ``ModelSession``, same
   intra-op threads) at its best batch size, against the pipeline's throughput,
   on ``digits`` and on ``minilm`` (skipped with a line saying why when the
   registry has no ``minilm``); ``minilm`` in cycles, each between two raw
   measurements (see :func:`minilm_cycles`), on the whole machine and again with
   the worker on dedicated cores (see :func:`dedicated_cycles`);
2. transport limit: raw aiokafka, one producer to one consumer through the same
   broker (``bench/throughput.py``'s measurement);
3. a naive Faust agent that runs the model once per message (``bench/naive_agent.py``);
4. Ray Serve with ``@serve.batch`` serving the same ONNX model over HTTP at the
   same batch limits (``bench/ray_serve_app.py``), closed loop with many
   concurrent requests from an aiohttp load generator, against the pipeline
   closed loop at the same concurrency;
5. latency percentiles against offered load, open loop at fractions of each
   system's closed-loop capacity, for the pipeline and Ray Serve; the pipeline also
   at Ray Serve's offered rates (Ray Serve runs first), to compare at equal load.

It writes ``bench/RESULTS.md``, ``bench/latency_vs_load.png``,
``bench/throughput.png`` and ``bench/out/suite.json``. ``--quick`` shortens every
measurement (about a third of the time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agents.processes import ServeProcess  # noqa: E402
from agents.serve import prepare_topics  # noqa: E402
from bench import loadgen, prepare_process, results  # noqa: E402
from bench.placement import pin_process, pinned_thread, split_cores  # noqa: E402
from bench.throughput import (  # noqa: E402
    BenchError,
    CpuMeter,
    _stop_process,
    digits_requests,
    measure_aiokafka_hop,
    measure_naive_faust,
    run_burst,
)
from pipeline.batchio import read_records  # noqa: E402
from pipeline.batchjob import BatchJob, BatchJobConfig, job_client  # noqa: E402
from pipeline.broker import EmbeddedBroker, free_port  # noqa: E402
from pipeline.client import InferenceClient  # noqa: E402
from pipeline.errors import InferlineError  # noqa: E402
from pipeline.modelstore import ensure_models, load_heldout  # noqa: E402
from pipeline.registry import ModelVersion, Registry  # noqa: E402
from pipeline.scheduler import RECENT_S  # noqa: E402
from pipeline.session import ModelSession  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.text import sample_texts  # noqa: E402

OUT_DIR = ROOT / "bench" / "out"
RAY_APP = ROOT / "bench" / "ray_serve_app.py"
LOAD_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
QUICK_FRACTIONS = (0.25, 0.5, 0.8, 1.1)
# Interactive requests count as traffic for RECENT_S after the last one arrives, and
# bulk batches are spaced out while it flows: a bulk job starts this long after an
# interactive measurement, on a quiet pool, as it would overnight.
QUIET_POOL_S = RECENT_S + 0.5


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
            # minilm runs of about 10 s each: the host's fast and slow spells last seconds.
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
                    start = time.perf_counter()
                    until = start + min_s / rounds
                    runs = sum(pool.map(spin, [n] * instances, range(instances),
                                        [until] * instances))
                    samples[str(n)].append(runs * n / (time.perf_counter() - start))
    per = {k: float(np.median(v)) for k, v in samples.items()}
    best = max(per, key=lambda k: per[k])
    return {"rows_per_s_by_batch_size": per, "best_batch_size": int(best),
            "best_rows_per_s": per[best], "intra_op_threads": threads, "instances": instances,
            "samples": samples, "max_batch_size": spec.max_batch_size}


def minilm_batch(n: int, offset: int) -> dict[str, Any]:
    """``n`` sample texts from ``offset`` on: the raw ONNX Runtime input."""
    return {"text": sample_texts(n, offset=offset)}


def minilm_requests(n: int, tag: str) -> list[dict[str, Any]]:
    """``n`` one-text minilm requests over the sample texts."""
    texts = [t.decode() for t in sample_texts(n).tolist()]
    return [{"id": f"{tag}-{i}", "model": "minilm", "inputs": [
        {"name": "text", "shape": [1], "datatype": "BYTES", "data": [texts[i]]}]}
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
            probes = {"digits": {"input": x[:1]}, "minilm": {"text": sample_texts(1)}}
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


async def pipeline_runs(plan: Plan, base: Settings, bootstrap: str, models: list[str],
                        logs: Path, broker_pid: int | None,
                        ort_minilm: dict[str, Any] | None, also_at: tuple[float, ...]
                        ) -> dict[str, Any]:
    """Digits burst, closed and open loop and bulk jobs through one pipeline; then minilm."""
    out: dict[str, Any] = {}
    x, _ = load_heldout(base.model_dir)
    async with fleet(base, bootstrap, ["digits"], logs, broker_pid) as (s, pids):
        big = max(plan.digits_requests, plan.warmup) * 4
        async with InferenceClient(s, bootstrap_servers=bootstrap, max_in_flight=big) as client:
            step(f"pipeline digits burst: {plan.digits_requests} requests "
                 f"(+{plan.warmup} warm-up)")
            await run_burst(client, digits_requests(x, plan.warmup, "warm"))
            burst = await run_burst(client, digits_requests(x, plan.digits_requests, "d"),
                                    CpuMeter(pids))
            out["digits_burst"] = asdict(burst)
            step(f"    {burst.throughput_rps:,.0f} req/s, ok {burst.ok_share:.1%}, "
                 f"mean batch {burst.mean_batch_size:.1f}")
            rows = [x[i % len(x)].tolist() for i in range(len(x))]
            tag = uuid.uuid4().hex[:6]

            def make(i: int) -> dict[str, Any]:
                return {"id": f"{tag}-{i}", "model": "digits", "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32",
                     "data": rows[i % len(rows)]}]}

            send = loadgen.pipeline_sender(client, make)
            out.update(await load_curve(plan, "pipeline", send, also_at))
        out["digits_jobs"] = await digits_jobs(plan, s, bootstrap, pids, x)
    if "minilm" in models and ort_minilm is not None:
        out["minilm_burst"] = await minilm_cycles(plan, base, bootstrap, logs, broker_pid,
                                                  ort_minilm)
        out["minilm_dedicated"] = await dedicated_cycles(
            plan, base, bootstrap, logs, broker_pid, best_sizes(ort_minilm))
    return out


async def minilm_cycles(plan: Plan, base: Settings, bootstrap: str, logs: Path,
                        broker_pid: int | None, ort_minilm: dict[str, Any]) -> dict[str, Any]:
    """minilm through the pipeline in cycles, each between two raw measurements.

    The shared CPUs drift: a single raw figure taken minutes away from the
    pipeline's run is no measure of the limit the pipeline ran under. So raw ONNX
    Runtime is measured at the sweep's two best batch sizes before the first cycle
    and after each one, with the pipeline's processes stopped (their idle polling is
    the pipeline's cost, not the limit's). A cycle starts a pool serving minilm
    alone, sends a burst and then a bulk job of the same texts, and stops it.

    Its limit is raw's mean rate over both sides' rounds, at the better of the two
    sizes. The host also flips between fast and slow spells every few seconds (ORT
    CPU per text 3,640 against 4,230 µs in 2.5-s windows seconds apart): the highest of
    several one-second figures is a fast spell's rate, while a 7-s pipeline run
    spans both. So the limit is not the highest figure either side; that one is
    kept beside it (``limit_max_rows_per_s``) for comparison. The ratios are the
    median cycle's.
    """
    spec = Registry.load(base.registry_path).resolve("minilm")
    sizes = best_sizes(ort_minilm)
    configs = [(int(c["intra_op_threads"]), int(c["instances"]))
               for c in ort_minilm.get("configurations") or [ort_minilm]]

    async def raw_now() -> list[dict[str, Any]]:
        # Every thread configuration of the sweep: which one is faster flips with
        # the host's spells too.
        runs = []
        for threads, instances in configs:
            runs.append(await asyncio.to_thread(
                raw_onnxruntime, spec, minilm_batch, sizes, plan.ort_seconds,
                threads, 3, instances))
        step(f"    raw ONNX Runtime minilm at {sizes}, pipeline stopped: " + ", ".join(
            f"{r['intra_op_threads']}x{r['instances']}: {r['best_rows_per_s']:,.0f} texts/s "
            f"at {r['best_batch_size']}" for r in runs))
        return runs

    raws = [await raw_now()]
    cycles: list[dict[str, Any]] = []
    for c in range(plan.minilm_cycles):
        step(f"minilm cycle {c + 1} of {plan.minilm_cycles}")
        burst, job = await minilm_run(plan, base, bootstrap, logs, broker_pid)
        raws.append(await raw_now())
        cycles.append(cycle_record(burst, job, raws[-2], raws[-1]))
    ort_minilm["between_cycles_rows_per_s"] = [
        max(float(r["best_rows_per_s"]) for r in runs) for runs in raws]
    ort_minilm["between_cycles_samples"] = [
        {f"{r['intra_op_threads']}x{r['instances']}": r["samples"] for r in runs}
        for runs in raws]
    return summarize_cycles(cycles)


def best_sizes(ort_minilm: dict[str, Any]) -> tuple[int, ...]:
    """The sweep's two best batch sizes: which of them is best is itself within the noise."""
    per_size = ort_minilm["rows_per_s_by_batch_size"]
    return tuple(sorted(int(k) for k in sorted(per_size, key=per_size.__getitem__)[-2:]))


async def dedicated_cycles(plan: Plan, base: Settings, bootstrap: str, logs: Path,
                           broker_pid: int | None, sizes: tuple[int, ...]) -> dict[str, Any]:
    """minilm cycles as :func:`minilm_cycles` runs them, with the worker on its own cores.

    The worker computes on the compute half of the CPUs (one one-thread instance
    per core); the broker, the router and this process (the load generator) run on
    the other half. Raw ONNX Runtime is measured between cycles on the same compute
    cores with as many one-thread runs at once, the pipeline stopped. So the ratio
    is the pipeline's cost on the cores that compute, as a deployment with the
    broker and the producers on other machines would see it; the whole-machine
    cycles charge it the co-located processes too. Skipped, with the reason, where
    the CPUs cannot be split.
    """
    cores, why = split_cores()
    if cores is None:
        step(f"dedicated-core minilm skipped: {why}")
        return {"skipped": why}
    k = len(cores.compute)
    spec = Registry.load(base.registry_path).resolve("minilm")
    dbase = base.model_copy(update={"intra_op_threads": 1, "model_instances": k})
    dplan = replace(plan, minilm_requests=plan.dedicated_requests)
    step(f"minilm with the worker on CPUs {sorted(cores.compute)}, broker, router and "
         f"load generator on CPUs {sorted(cores.transport)}")

    def raw_on_compute() -> dict[str, Any]:
        with pinned_thread(cores.compute):
            return raw_onnxruntime(spec, minilm_batch, sizes, plan.ort_seconds, 1, 3, k)

    async def raw_now() -> list[dict[str, Any]]:
        r = await asyncio.to_thread(raw_on_compute)
        step(f"    raw ONNX Runtime minilm on CPUs {sorted(cores.compute)}, 1x{k}, pipeline "
             f"stopped: {r['best_rows_per_s']:,.0f} texts/s at {r['best_batch_size']}")
        return [r]

    def place(pids: dict[str, int | None]) -> None:
        for role, pid in pids.items():
            pin_process(pid or os.getpid(), cores.compute if role == "worker" else cores.transport)

    others = {"bench_client": os.getpid(), "broker": broker_pid}
    try:
        for pid in others.values():
            if pid:
                pin_process(pid, cores.transport)
        raws = [await raw_now()]
        cycles: list[dict[str, Any]] = []
        for c in range(plan.dedicated_cycles):
            step(f"dedicated-core minilm cycle {c + 1} of {plan.dedicated_cycles}")
            burst, job = await minilm_run(dplan, dbase, bootstrap, logs, broker_pid, place)
            raws.append(await raw_now())
            cycles.append(cycle_record(burst, job, raws[-2], raws[-1]))
    finally:
        for pid in others.values():
            if pid:
                with contextlib.suppress(OSError):
                    pin_process(pid, cores.every)
    out = summarize_cycles(cycles)
    out["compute_cpus"] = sorted(cores.compute)
    out["transport_cpus"] = sorted(cores.transport)
    out["raw_rows_per_s"] = [float(r[0]["best_rows_per_s"]) for r in raws]
    return out


def cycle_record(burst: dict[str, Any], job: dict[str, Any], before: list[dict[str, Any]],
                 after: list[dict[str, Any]]) -> dict[str, Any]:
    """One cycle's burst and job against the limit from the raw runs either side."""
    limit, highest = cycle_limit(before, after)
    cycle = {"limit_rows_per_s": limit, "limit_max_rows_per_s": highest,
             "burst": burst, "job": job}
    for part, run in (("burst", burst), ("job", job)):
        cycle[f"{part}_ratio"] = run["throughput_rps"] / limit
        cycle[f"{part}_ratio_max"] = run["throughput_rps"] / highest
    return cycle


def cycle_limit(before: list[dict[str, Any]], after: list[dict[str, Any]]
                ) -> tuple[float, float]:
    """A cycle's limit from the raw runs either side, and their highest best figure.

    ``before`` and ``after`` hold one run per thread configuration, in the same
    order. The limit is, per configuration and batch size, the mean of both sides'
    round rates (rounds are of equal length), the best of those taken.
    """
    pooled = [float(np.mean(list(b["samples"][size]) + list(a["samples"][size])))
              for b, a in zip(before, after, strict=True) for size in b["samples"]]
    highest = max(float(r["best_rows_per_s"]) for r in [*before, *after])
    return max(pooled), highest


def summarize_cycles(cycles: list[dict[str, Any]]) -> dict[str, Any]:
    """The cycles' burst and job figures in one record: medians, totals, each cycle's."""
    def med(values: list[float]) -> float:
        return float(np.median(values))

    bursts, jobs = [c["burst"] for c in cycles], [c["job"] for c in cycles]
    return {
        "cycles": cycles,
        "ratio": med([c["burst_ratio"] for c in cycles]),
        "ratio_max": med([c["burst_ratio_max"] for c in cycles]),
        "throughput_rps": med([b["throughput_rps"] for b in bursts]),
        "requests": sum(b["requests"] for b in bursts),
        "ok_share": min(b["ok_share"] for b in bursts),
        "mean_batch_size": med([b["mean_batch_size"] for b in bursts]),
        "p50_ms": med([b["p50_ms"] for b in bursts]),
        "p99_ms": med([b["p99_ms"] for b in bursts]),
        "job": {
            "ratio": med([c["job_ratio"] for c in cycles]),
            "ratio_max": med([c["job_ratio_max"] for c in cycles]),
            "throughput_rps": med([j["throughput_rps"] for j in jobs]),
            "rows": sum(j["rows"] for j in jobs),
            "ok_share": min(j["ok_share"] for j in jobs),
            "state": ", ".join(sorted({j["state"] for j in jobs})),
            "p50_ms": med([j["p50_ms"] for j in jobs]),
            "cost_usd": sum(j["cost_usd"] for j in jobs),
        },
    }


async def minilm_run(plan: Plan, base: Settings, bootstrap: str, logs: Path,
                     broker_pid: int | None,
                     place: Callable[[dict[str, int | None]], None] | None = None,
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The minilm burst, then the bulk job, through a pool serving minilm alone.

    ``place``, when given, is called with the fleet's process ids once it serves
    (before the warm-up), to put its processes on CPUs.
    """
    async with fleet(base, bootstrap, ["minilm"], logs, broker_pid) as (s, pids):
        if place is not None:
            place(pids)
        async with InferenceClient(s, bootstrap_servers=bootstrap,
                                   max_in_flight=plan.minilm_requests * 4) as client:
            step(f"pipeline minilm burst: {plan.minilm_requests} texts")
            await run_burst(client, minilm_requests(plan.warmup // 10, "mwarm"))
            mb = await run_burst(client, minilm_requests(plan.minilm_requests, "m"),
                                 CpuMeter(pids))
            step(f"    {mb.throughput_rps:,.0f} texts/s, ok {mb.ok_share:.1%}, "
                 f"mean batch {mb.mean_batch_size:.1f}")
        await asyncio.sleep(QUIET_POOL_S)
        job = await minilm_job(plan, s, bootstrap, pids)
        return asdict(mb), job


async def minilm_job(plan: Plan, s: Settings, bootstrap: str,
                     pids: dict[str, int | None]) -> dict[str, Any]:
    """The same texts as a bulk job, sent as ``inferline batch run`` sends them.

    Rows go straight to the ``batch`` lane under a job id and the answers are read
    in bulk; the time counts from the job's start (reading its input) to its
    output finalized, in input order.
    """
    n = plan.minilm_requests
    lines = [orjson.dumps({"text": t.decode()}) + b"\n" for t in sample_texts(n).tolist()]
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        await _timed_job(s, bootstrap, Path(tmp), "warm", lines[: max(n // 10, 1)], pids)
        step(f"pipeline minilm bulk job: {n} texts on the batch lane")
        out = await _timed_job(s, bootstrap, Path(tmp), "run", lines, pids)
    step(f"    {out['throughput_rps']:,.0f} texts/s, ok {out['ok_share']:.1%}, "
         f"state {out['state']}")
    return out


async def digits_jobs(plan: Plan, s: Settings, bootstrap: str, pids: dict[str, int | None],
                      x: Any) -> dict[str, Any]:
    """A digits bulk job with rows packed 16 to a request, and with each row alone.

    For a model this small a request's fixed cost (a record, an encode, a decode, an
    answer) is most of a row's: packing is what the job's throughput and CPU, and
    so the interactive traffic beside it, gain from. Each way runs twice, in the
    order 16, 1, 1, 16, so that drift of the shared machine falls on both alike.
    """
    n = plan.digits_requests // 2
    lines = [orjson.dumps({"input": x[i % len(x)].tolist()}) + b"\n" for i in range(n)]
    runs: dict[int, list[dict[str, Any]]] = {16: [], 1: []}
    await asyncio.sleep(QUIET_POOL_S)
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        await _timed_job(s, bootstrap, Path(tmp), "dwarm", lines[: max(n // 10, 1)], pids,
                         model="digits")
        for i, k in enumerate((16, 1, 1, 16)):
            step(f"pipeline digits bulk job: {n} rows, {k} per request")
            job = await _timed_job(s, bootstrap, Path(tmp), f"d{k}-{i}", lines, pids,
                                   model="digits", rows_per_request=k)
            step(f"    {job['throughput_rps']:,.0f} rows/s, ok {job['ok_share']:.1%}, "
                 f"state {job['state']}")
            runs[k].append(job)
    out: dict[str, Any] = {}
    for k, done in runs.items():
        rows, seconds = sum(j["rows"] for j in done), sum(j["seconds"] for j in done)
        cpu: dict[str, float] = {}
        for j in done:
            for name, v in j["cpu_s"].items():
                cpu[name] = cpu.get(name, 0.0) + v
        out[f"rows_per_request_{k}"] = {
            "rows": rows, "seconds": seconds, "throughput_rps": rows / seconds,
            "ok_share": sum(j["ok"] for j in done) / rows,
            "state": ", ".join(sorted({j["state"] for j in done})), "cpu_s": cpu,
            "runs_rps": [j["throughput_rps"] for j in done]}
    return out


async def _timed_job(s: Settings, bootstrap: str, folder: Path, tag: str, lines: list[bytes],
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
            "p50_ms": float(np.percentile(lat, 50)) if lat else float("nan"),
            "cpu_s": used, "machine_busy_share": busy}


async def load_curve(plan: Plan, name: str, send: Any, also_at: tuple[float, ...] = ()
                     ) -> dict[str, Any]:
    """Closed loop at the plan's concurrency, then open loop at fractions of that rate.

    ``also_at``: more offered rates (another system's), so that both can be compared
    at equal load.
    """
    step(f"{name} closed loop: {plan.concurrency} concurrent for {plan.closed_seconds:.0f}s")
    closed = await loadgen.closed_loop(send, concurrency=plan.concurrency,
                                       seconds=plan.closed_seconds, warmup_s=1.0)
    step(f"    {closed.throughput_rps:,.0f} req/s, p50 {closed.p50_ms:.1f} ms, "
         f"p99 {closed.p99_ms:.1f} ms, mean batch {closed.mean_batch_size:.1f}")
    points = []
    first = 10_000_000
    rates = {round(max(closed.throughput_rps * f, 10.0), 1): f"{f:.0%}" for f in plan.fractions}
    for rate in also_at:
        rates.setdefault(rate, "the peer's rate")
    for rate in sorted(rates):
        r = await loadgen.open_loop(send, rate=rate, seconds=plan.open_seconds, first=first)
        first += r.sent + 1
        step(f"    open loop {rate:,.0f}/s ({rates[rate]}): {r.throughput_rps:,.0f} ok/s, "
             f"p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, unfinished {r.unfinished}")
        points.append(asdict(r))
    return {"closed_loop": asdict(closed), "open_loop": points}


# --------------------------------------------------------------------------- Ray Serve


async def ray_runs(plan: Plan, spec: ModelVersion, registry: Path, probe: bytes,
                   bodies: list[bytes], logs: Path) -> dict[str, Any]:
    """Start the Ray Serve baseline, load it like the pipeline, stop it."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"ray[serve] is not installed ({exc}); pip install 'inferline[bench]'"}
    port = free_port()
    probe_path = logs / "ray-probe.json"
    probe_path.write_bytes(probe)
    log_path = logs / "ray-serve.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(RAY_APP), "--registry", str(registry), "--model", spec.name,
            "--port", str(port), "--max-batch-size", str(spec.max_batch_size),
            "--batch-wait-ms", str(spec.max_wait_ms),
            "--intra-op-threads", str(plan.intra_op_threads), "--probe", str(probe_path),
            env=env, cwd=str(ROOT), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 240)
        if not line.startswith(b"READY"):
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise BenchError(f"Ray Serve did not start (exit {proc.returncode}):\n{tail}")
        ready_s = time.perf_counter() - started
        step(f"Ray Serve ready on port {port} after {ready_s:.0f}s "
             f"(max_batch_size={spec.max_batch_size}, "
             f"batch_wait_timeout_s={spec.max_wait_ms / 1000:g})")
        url = f"http://127.0.0.1:{port}/{spec.name}"
        async with loadgen.http_session(limit=0) as session:
            send = loadgen.http_sender(session, url, bodies)
            await loadgen.closed_loop(send, concurrency=plan.concurrency, seconds=1.0,
                                      warmup_s=0.0)
            out = await load_curve(plan, "Ray Serve", send)
        out["ready_after_s"] = ready_s
        out["max_batch_size"] = spec.max_batch_size
        out["batch_wait_timeout_s"] = spec.max_wait_ms / 1000
        return out
    finally:
        await _stop_process(proc, grace_s=60)


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement; returns the results."""
    plan = Plan.of(args)
    logs = OUT_DIR / "logs-suite"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="inferline-suite-"))
    model_dir = Path(args.model_dir) if args.model_dir else Settings().model_dir
    base = Settings(model_dir=model_dir, registry=None, state_dir=tmp / "state",
                    bootstrap_servers=None, topic_prefix="bench",
                    intra_op_threads=plan.pipeline_threads, model_instances=plan.instances)
    res: dict[str, Any] = {
        "plan": asdict(plan), "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
                    "python": platform.python_version(), "platform": platform.platform()},
        "versions": results.versions(), "notes": [],
    }
    t0 = time.perf_counter()
    try:
        step(f"models in {model_dir}")
        await asyncio.to_thread(ensure_models, model_dir, models=["digits"])
        models = ["digits"]
        try:
            await asyncio.to_thread(ensure_models, model_dir, models=["minilm"])
            models.append("minilm")
        except (InferlineError, ImportError, OSError) as exc:
            note = f"minilm is not in the registry and could not be built ({exc}); " \
                   "its comparisons are skipped"
            res["notes"].append(note)
            step(note)
        registry = Registry.load(base.registry_path)
        x, _ = load_heldout(model_dir)
        sizes = (1, 8, 16, 32, 64, 128, 256, 512)
        step(f"raw ONNX Runtime digits, batch sizes {sizes}, "
             f"{plan.intra_op_threads} intra-op threads")
        res["ort_digits"] = await asyncio.to_thread(
            raw_onnxruntime, registry.resolve("digits"),
            lambda n, k: {"input": np.ascontiguousarray(x[(np.arange(n) + k) % len(x)],
                                                        np.float32)},
            sizes, plan.ort_seconds, plan.intra_op_threads)
        step(f"    best {res['ort_digits']['best_rows_per_s']:,.0f} rows/s at "
             f"{res['ort_digits']['best_batch_size']}")
        if "minilm" in models:
            msizes = (1, 8, 16, 32, 64, 128)
            # The limit is ORT's best on this machine: one run over all threads, or
            # as many one-thread runs at once as the pipeline's worker makes.
            configs = {(plan.intra_op_threads, 1), (plan.pipeline_threads, plan.instances)}
            tried = []
            for threads, inst in sorted(configs):
                step(f"raw ONNX Runtime minilm (tokenizing included), batch sizes {msizes}, "
                     f"{threads} intra-op thread(s) x {inst} run(s) at once")
                one = await asyncio.to_thread(
                    raw_onnxruntime, registry.resolve("minilm"),
                    minilm_batch, msizes, plan.ort_seconds, threads, 3, inst)
                step(f"    best {one['best_rows_per_s']:,.0f} texts/s at "
                     f"{one['best_batch_size']}")
                tried.append(one)
            res["ort_minilm"] = max(tried, key=lambda r: r["best_rows_per_s"])
            res["ort_minilm"]["configurations"] = [
                {k: r[k] for k in ("intra_op_threads", "instances", "best_batch_size",
                                   "best_rows_per_s")} for r in tried]

        # Ray Serve first: the pipeline then also runs at Ray's offered rates.
        if args.skip_ray:
            res["ray"] = {"skipped": "--skip-ray"}
        else:
            bodies = [json.dumps(r).encode() for r in digits_requests(x, len(x), "ray")]
            res["ray"] = await ray_runs(plan, registry.resolve("digits"), base.registry_path,
                                        bodies[0], bodies, logs)
            if "skipped" in res["ray"]:
                step(f"Ray Serve skipped: {res['ray']['skipped']}")
        ray_rates = tuple(p["offered_rps"] for p in res["ray"].get("open_loop", []))

        broker = EmbeddedBroker(log_path=logs / "broker.log")
        bootstrap = await broker.start()
        try:
            res["pipeline"] = await pipeline_runs(plan, base, bootstrap, models, logs,
                                                  broker.pid, res.get("ort_minilm"),
                                                  ray_rates)
            step(f"raw aiokafka one hop: {plan.hop_records} records")
            res["aiokafka_hop"] = await measure_aiokafka_hop(
                base, bootstrap, x, plan.hop_records, plan.warmup, broker.pid)
            step(f"    {res['aiokafka_hop']['throughput_rps']:,.0f} records/s")
            step(f"naive Faust agent: {plan.naive_requests} requests")
            naive = await measure_naive_faust(
                base, bootstrap, x, registry.resolve("digits").path, plan.naive_requests,
                plan.warmup // 4, logs, tmp / "state", broker.pid)
            res["naive_faust"] = asdict(naive)
            step(f"    {naive.throughput_rps:,.0f} req/s, ok {naive.ok_share:.1%}")
        finally:
            await broker.stop()

    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["elapsed_s"] = time.perf_counter() - t0
    res["ratios"] = results.ratios(res)
    return res


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs (a few minutes)")
    p.add_argument("--model-dir", default=None,
                   help="model store to reuse or build into (default: INFERLINE_MODEL_DIR)")
    p.add_argument("--concurrency", type=int, default=256,
                   help="closed-loop requests in flight, pipeline and Ray alike (default 256)")
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads everywhere (default: the CPU count)")
    p.add_argument("--instances", type=int, default=0,
                   help="batches per model the pipeline's worker computes at once "
                        "(0: one per intra-op thread)")
    p.add_argument("--skip-ray", action="store_true", help="leave out the Ray Serve baseline")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"),
                   help="where to write the report (plots go beside it)")
    args = p.parse_args(argv)
    prepare_process()
    try:
        res = asyncio.run(run(args))
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "suite.json").write_text(json.dumps(res, indent=2, allow_nan=True) + "\n")
    report = Path(args.results)
    results.write(res, report)
    print(report.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
