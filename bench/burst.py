"""Bursts of requests through an :class:`~pipeline.client.InferenceClient`, and the
CPU they cost: what every throughput measurement of the bench shares.

:func:`run_burst` submits requests as fast as it can and awaits every answer;
:class:`CpuMeter` reads the CPU seconds of named processes (and the machine's busy
share) over a window; :func:`wait_ready` probes a fleet until it answers, and
:func:`ready_burst` does all three in the order a measurement needs them.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.client import InferenceClient
from pipeline.errors import ClientTimeout
from schemas.messages import InferenceResponse

MODEL = "digits"
READY_TIMEOUT_S = 120.0
PROBE_WAIT_MS = 3000
# Responses still missing this long after the last submit count as lost.
DRAIN_TIMEOUT_S = 180.0


class BenchError(RuntimeError):
    """A measurement could not be made."""


@dataclass
class Burst:
    """What an open-loop burst of requests through an InferenceClient measured."""

    requests: int
    seconds: float = 0.0
    throughput_rps: float = 0.0
    answered: int = 0
    ok: int = 0
    ok_share: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_batch_size: float = 0.0
    server_total_p50_ms: float = 0.0
    execution_providers: list[str] = field(default_factory=list)
    submit_seconds: float = 0.0
    first_response_ms: float = 0.0
    steady_rps: float = 0.0
    client_stats: dict[str, int] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)
    machine_busy_share: float = 0.0
    ready_after_s: float = 0.0
    warmup_requests: int = 0
    topic_prefix: str = ""


# --------------------------------------------------------------------------- helpers


def digits_requests(
    x: np.ndarray[Any, Any], n: int, tag: str, reply_to: str | None = None
) -> list[dict[str, Any]]:
    """``n`` single-row digits requests cycling over the held-out rows."""
    rows = [x[i].tolist() for i in range(len(x))]
    out: list[dict[str, Any]] = []
    for i in range(n):
        req: dict[str, Any] = {
            "id": f"{tag}-{i}",
            "model": MODEL,
            "inputs": [
                {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": rows[i % len(rows)]}
            ],
        }
        if reply_to is not None:
            req["reply_to"] = reply_to
        out.append(req)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (NaN when there are none)."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


async def wait_ready(
    client: InferenceClient,
    x: np.ndarray[Any, Any],
    alive: Any,
    describe: Any,
    timeout_s: float = READY_TIMEOUT_S,
) -> float:
    """Probe until one request is answered ok; returns the seconds it took.

    ``alive()`` returns an error message when a child process has died;
    ``describe()`` gives the log tails for the timeout message.
    """
    started = time.perf_counter()
    while True:
        dead = alive()
        if dead:
            raise BenchError(dead)
        try:
            resp = await client.infer(MODEL, {"input": x[:1]}, wait_timeout_ms=PROBE_WAIT_MS)
            if resp.status == "ok":
                return time.perf_counter() - started
        except ClientTimeout:
            pass
        if time.perf_counter() - started > timeout_s:
            raise BenchError(f"not ready after {timeout_s:.0f}s:\n{describe()}")


async def run_burst(
    client: InferenceClient, requests: list[dict[str, Any]], cpu: CpuMeter | None = None
) -> Burst:
    """Submit every request as fast as possible, then await all responses."""
    n = len(requests)
    sent_at = [0.0] * n
    done_at = [0.0] * n
    futures: list[asyncio.Future[InferenceResponse]] = []
    perf = time.perf_counter

    def stamp(i: int) -> Any:
        def _done(_: Any) -> None:
            done_at[i] = perf()

        return _done

    if cpu is not None:
        cpu.start()
    first = perf()
    for i, req in enumerate(requests):
        sent_at[i] = perf()
        fut = await client.submit(req)
        fut.add_done_callback(stamp(i))
        futures.append(fut)
    submitted = perf()
    _, pending = await asyncio.wait(futures, timeout=DRAIN_TIMEOUT_S)
    for fut in pending:
        fut.cancel()
    burst = Burst(requests=n, submit_seconds=submitted - first)
    if cpu is not None:
        burst.cpu_s, burst.machine_busy_share = cpu.stop()
        burst.cpu_us_per_request = {k: v / n * 1e6 for k, v in burst.cpu_s.items()} if n else {}
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    batch_sizes: list[int] = []
    server_total: list[float] = []
    providers: set[str] = set()
    last = first
    for i, fut in enumerate(futures):
        if fut.cancelled():
            statuses["no_response"] = statuses.get("no_response", 0) + 1
            continue
        if fut.exception() is not None:
            key = f"client_error:{type(fut.exception()).__name__}"
            statuses[key] = statuses.get(key, 0) + 1
            continue
        resp = fut.result()
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        latencies.append((done_at[i] - sent_at[i]) * 1000)
        last = max(last, done_at[i])
        if resp.status == "ok":
            batch_sizes.append(resp.batch_size)
            if resp.timing is not None:
                server_total.append(resp.timing.total_ms)
            if resp.execution_provider:
                providers.add(resp.execution_provider)
    finished = sorted(done_at[i] for i, f in enumerate(futures) if f.done() and not f.cancelled())
    if finished:
        burst.first_response_ms = (finished[0] - first) * 1000
    if len(finished) >= 10:
        # The middle 80% of responses: the rate once the pipe is full, without the time
        # to the first answer (a consumer's parked fetch, say) or the stragglers.
        lo, hi = finished[len(finished) // 10], finished[(len(finished) * 9) // 10]
        if hi > lo:
            burst.steady_rps = ((len(finished) * 9) // 10 - len(finished) // 10) / (hi - lo)
    burst.answered = len(latencies)
    burst.ok = statuses.get("ok", 0)
    burst.ok_share = burst.ok / n if n else 0.0
    burst.statuses = statuses
    burst.seconds = last - first
    # Only answered requests count towards the rate; the ok share says how many that is.
    burst.throughput_rps = burst.answered / burst.seconds if burst.seconds > 0 else 0.0
    burst.p50_ms = percentile(latencies, 50)
    burst.p99_ms = percentile(latencies, 99)
    burst.mean_batch_size = statistics.fmean(batch_sizes) if batch_sizes else 0.0
    burst.server_total_p50_ms = percentile(server_total, 50)
    burst.execution_providers = sorted(providers)
    burst.client_stats = client.stats()
    return burst


async def ready_burst(
    client: InferenceClient, x: np.ndarray[Any, Any], n: int, warmup: int, tag: str,
    pids: dict[str, int | None], alive: Any, describe: Any, topic_prefix: str,
) -> Burst:
    """A fleet's measured burst of ``n`` digits requests, once it answers.

    Probes until one request is answered (:func:`wait_ready`), sends ``warmup``
    requests unmeasured, then the burst with the CPU of ``pids`` metered.
    """
    ready = await wait_ready(client, x, alive, describe)
    if warmup:
        await run_burst(client, digits_requests(x, warmup, f"{tag}-warm"))
    burst = await run_burst(client, digits_requests(x, n, tag), CpuMeter(pids))
    burst.ready_after_s = ready
    burst.warmup_requests = warmup
    burst.topic_prefix = topic_prefix
    return burst


def _proc_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux /proc), None if unknown."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    try:
        parts = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


class CpuMeter:
    """CPU seconds used by named processes (None: this one) over a window."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self._start: dict[str, float | None] = {}
        self._machine: tuple[int, int] | None = None

    def start(self) -> None:
        """Open the window: read every process's CPU time and the machine's ticks."""
        self._start = {name: _proc_cpu_s(pid) for name, pid in self.pids.items()}
        self._machine = _machine_ticks()

    def stop(self) -> tuple[dict[str, float], float]:
        """Close it: CPU seconds per named process, and the share of the machine busy."""
        used: dict[str, float] = {}
        for name, pid in self.pids.items():
            before, after = self._start.get(name), _proc_cpu_s(pid)
            if before is not None and after is not None:
                used[name] = after - before
        end = _machine_ticks()
        busy = 0.0
        if self._machine is not None and end is not None and end[1] > self._machine[1]:
            busy = (end[0] - self._machine[0]) / (end[1] - self._machine[1])
        return used, busy


def fresh_prefix(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:8]}"
