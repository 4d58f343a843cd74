"""minilm through the pipeline in cycles, each between two raw ONNX Runtime measurements.

On the whole machine (:func:`minilm_cycles`) and with the worker on dedicated
cores (:func:`dedicated_cycles`); each cycle is a burst of one-text requests and
then a bulk job of the same texts (:func:`minilm_run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.burst import BenchError, CpuMeter, run_burst
from bench.cpu_budget import cycle_budget, limit_choice, median_cycle_budget, raw_cpu_us
from bench.placement import pin_process, pinned_thread, split_cores
from bench.suite import (
    QUIET_POOL_S,
    Plan,
    fleet,
    minilm_batch,
    minilm_requests,
    raw_onnxruntime,
    step,
    timed_job,
)
from pipeline.broker import EmbeddedBroker
from pipeline.client import InferenceClient
from pipeline.registry import Registry
from pipeline.settings import Settings
from pipeline.text import sample_texts


async def minilm_cycles(plan: Plan, base: Settings, logs: Path,
                        ort_minilm: dict[str, Any]) -> dict[str, Any]:
    """minilm through the pipeline in cycles, each between two raw measurements.

    The shared CPUs drift: a single raw figure taken minutes away from the
    pipeline's run is no measure of the limit the pipeline ran under. So raw ONNX
    Runtime is measured at the sweep's two best batch sizes before the first cycle
    and after each one, with the pipeline's processes stopped (their idle polling is
    the pipeline's cost, not the limit's). A cycle starts a pool serving minilm
    alone, sends a burst and then a bulk job of the same texts, and stops it.

    Each cycle has an embedded broker of its own (see :func:`minilm_run`).

    Its limit is raw's mean rate over both sides' rounds, at the better of the two
    sizes. The host also flips between fast and slow spells every few seconds (ORT
    CPU per text 3,640 against 4,230 µs in 2.5-s windows seconds apart): the highest of
    several one-second figures is a fast spell's rate, while a 10-s pipeline run
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

    raws, cycles = await run_cycles(
        "minilm", plan.minilm_cycles, raw_now,
        lambda: minilm_run(plan, base, logs), cpus=os.cpu_count() or 1)
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


async def dedicated_cycles(plan: Plan, base: Settings, logs: Path,
                           sizes: tuple[int, ...]) -> dict[str, Any]:
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
        # Each cycle's broker and fleet, as they start; this process is placed below.
        for role, cpus in (("worker", cores.compute), ("router", cores.transport),
                           ("broker", cores.transport)):
            pid = pids[role]
            if pid is None:
                raise BenchError(f"the fleet's {role} has no process to place")
            pin_process(pid, cpus)

    # This process (the load generator) is placed for all the cycles; each cycle's
    # broker and fleet as they start (place, above).
    try:
        pin_process(os.getpid(), cores.transport)
        raws, cycles = await run_cycles(
            "dedicated-core minilm", plan.dedicated_cycles, raw_now,
            lambda: minilm_run(dplan, dbase, logs, place), cpus=k, counted=("worker",))
    finally:
        with contextlib.suppress(OSError):
            pin_process(os.getpid(), cores.every)
    out = summarize_cycles(cycles)
    out["compute_cpus"] = sorted(cores.compute)
    out["transport_cpus"] = sorted(cores.transport)
    out["raw_rows_per_s"] = [float(r[0]["best_rows_per_s"]) for r in raws]
    return out


async def run_cycles(label: str, count: int,
                     raw_now: Callable[[], Awaitable[list[dict[str, Any]]]],
                     run: Callable[[], Awaitable[tuple[dict[str, Any], dict[str, Any]]]],
                     *, cpus: int, counted: tuple[str, ...] | None = None,
                     ) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """``count`` runs (a burst and a job each), raw measured before the first and after each.

    Returns every raw measurement and each cycle's record (:func:`cycle_record`);
    ``cpus`` and ``counted`` are its CPU budget's (:func:`bench.cpu_budget.run_budget`).
    """
    raws = [await raw_now()]
    cycles: list[dict[str, Any]] = []
    for c in range(count):
        step(f"{label} cycle {c + 1} of {count}")
        burst, job = await run()
        raws.append(await raw_now())
        cycles.append(cycle_record(burst, job, raws[-2], raws[-1], cpus, counted))
    return raws, cycles


def cycle_record(burst: dict[str, Any], job: dict[str, Any], before: list[dict[str, Any]],
                 after: list[dict[str, Any]], cpus: int,
                 counted: tuple[str, ...] | None = None) -> dict[str, Any]:
    """One cycle's burst and job against the limit from the raw runs either side,
    with their CPU budgets against raw's (:mod:`bench.cpu_budget`)."""
    limit, highest = cycle_limit(before, after)
    cycle = {"limit_rows_per_s": limit, "limit_max_rows_per_s": highest,
             "burst": burst, "job": job,
             "cpu": cycle_budget(burst, job, limit, raw_cpu_us(before, after), cpus, counted)}
    for part, run in (("burst", burst), ("job", job)):
        cycle[f"{part}_ratio"] = run["throughput_rps"] / limit
        cycle[f"{part}_ratio_max"] = run["throughput_rps"] / highest
    return cycle


def cycle_limit(before: list[dict[str, Any]], after: list[dict[str, Any]]
                ) -> tuple[float, float]:
    """A cycle's limit (:func:`bench.cpu_budget.limit_choice`) and the highest best
    figure either side."""
    highest = max(float(r["best_rows_per_s"]) for r in [*before, *after])
    return limit_choice(before, after)[0], highest


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
        "cpu": {part: median_cycle_budget(cycles, part) for part in ("burst", "job")},
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


async def minilm_run(plan: Plan, base: Settings, logs: Path,
                     place: Callable[[dict[str, int | None]], None] | None = None,
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The minilm burst, then the bulk job, through a pool serving minilm alone.

    The pool has an embedded broker of its own, so that every cycle starts alike
    rather than on the records of the suite's earlier runs and cycles: the broker's
    cost grows with the record batches a partition holds (see README), and a little
    with what other topics hold (paired 8,000-text jobs, a new broker against one
    holding 150,000 records of 40 other topics, alternated four times: broker CPU
    81-95 against 84-99 µs per text, 925 against 920 texts/s). ``place``, when
    given, is called with the process ids once the pool serves (before the
    warm-up), to put them on CPUs.
    """
    async with EmbeddedBroker(log_path=logs / "broker-minilm.log") as broker, \
            fleet(base, broker.bootstrap_servers, ["minilm"], logs, broker.pid) as (s, pids):
        bootstrap = broker.bootstrap_servers
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
        await timed_job(s, bootstrap, Path(tmp), "warm", lines[: max(n // 10, 1)], pids)
        step(f"pipeline minilm bulk job: {n} texts on the batch lane")
        out = await timed_job(s, bootstrap, Path(tmp), "run", lines, pids)
    step(f"    {out['throughput_rps']:,.0f} texts/s, ok {out['ok_share']:.1%}, "
         f"state {out['state']}")
    return out
