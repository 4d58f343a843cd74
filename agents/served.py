"""What a worker serves: each model version's warmed session and batcher, and its scheduler.

Loading is blocking (sessions are built and warmed, and a few batch sizes are
timed to seed each model's compute model) and happens before the worker joins
its group, so the first batches are not scheduled blind.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agents.runtime import Runtime
from pipeline.batcher import DynamicBatcher
from pipeline.registry import ModelVersion
from pipeline.scheduler import ModelScheduler
from pipeline.session import ModelSession, representative_input
from pipeline.telemetry import Telemetry


@dataclass
class Served:
    """One model version this worker serves: its session and its batcher."""

    spec: ModelVersion
    session: ModelSession
    batcher: DynamicBatcher


@dataclass(slots=True)
class Job:
    """What a queued request needs to be run and answered."""

    msg: Any
    req: Any
    served: Served
    inputs: dict[str, Any]
    received_ms: float


def load_models(
    rt: Runtime, models: Iterable[str], telemetry: Telemetry, *, bulk_throttled: bool
) -> tuple[dict[tuple[str, str], Served], dict[str, ModelScheduler]]:
    """Load and warm every version of ``models``; one scheduler per model (blocking)."""
    s = rt.settings
    served: dict[tuple[str, str], Served] = {}
    schedulers: dict[str, ModelScheduler] = {}
    for name in models:
        timings: dict[str, list[tuple[int, float]]] = {}
        versions = rt.registry.entries[name].versions
        for spec in versions:
            provider = s.execution_provider if s.execution_provider != "auto" else (
                spec.execution_provider
            )
            session = ModelSession(
                spec, provider=provider, intra_op_threads=s.intra_op_threads,
                instances=s.model_instances or spec.instances,
            )
            session.load()
            session.warmup(spec.batch_buckets)
            timings[spec.version] = time_batches(session, spec)
            rt.metrics.model_ready.labels(
                spec.name, spec.version, session.execution_provider
            ).set(1)
            # A version that prefers CUDA but runs on CPU (health: provider fallback).
            rt.metrics.provider_fallback.labels(spec.name, spec.version).set(
                session.requested == "cuda" and "CPU" in session.execution_provider
            )
            batcher = DynamicBatcher(
                _runner(rt, telemetry, spec, session),
                max_batch_size=spec.max_batch_size,
                max_wait_ms=spec.max_wait_ms,
                name=spec.key,
                max_concurrent_batches=session.instances,
            )
            served[(spec.name, spec.version)] = Served(spec, session, batcher)
        sched = ModelScheduler(
            name,
            versions={v.version: (v.max_batch_size, v.max_wait_ms) for v in versions},
            slo_p99_ms={v.version: v.slo_p99_ms for v in versions},
            max_inflight=max(v.inflight_limit for v in versions),
            mode=s.scheduling,
            bulk_throttled=bulk_throttled,
        )
        for version, measured in timings.items():
            sched.seed(version, measured)
        schedulers[name] = sched
    return served, schedulers


def _runner(rt: Runtime, telemetry: Telemetry, spec: ModelVersion, session: ModelSession) -> Any:
    metrics = rt.metrics
    batch_hist = metrics.batch_size.labels(spec.name, spec.version)
    compute_hist = metrics.compute.labels(spec.name, spec.version)
    telemetry.register(spec.name, spec.version, session.execution_provider, spec.hourly_usd)

    async def run(inputs: dict[str, Any]) -> tuple[dict[str, Any], float]:
        outputs, compute_s = await session.run_async(inputs)
        rows = next(iter(inputs.values())).shape[0]
        batch_hist.observe(rows)
        compute_hist.observe(compute_s)
        telemetry.observe_compute(spec.name, spec.version, rows, compute_s, outputs)
        return outputs, compute_s

    return run


def time_batches(session: ModelSession, spec: ModelVersion) -> list[tuple[int, float]]:
    """Measured compute seconds at a few batch sizes, to seed the compute model."""
    sizes = sorted({1, max(1, spec.max_batch_size // 2), spec.max_batch_size})
    out: list[tuple[int, float]] = []
    for n in sizes:
        inputs = {t.name: representative_input(t, n) for t in spec.inputs}
        for _ in range(2):
            start = time.perf_counter()
            session.run(inputs)
            out.append((n, time.perf_counter() - start))
    return out
