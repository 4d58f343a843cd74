"""Load generators for ``python -m bench``: closed and open loop, over the pipeline or HTTP.

Closed loop: ``concurrency`` workers, each sends a request, awaits its answer and
sends the next, for ``seconds`` after a warm-up; throughput is what completes
in that window, latency each request's round trip.

Open loop: requests are due at a fixed ``rate`` whether or not earlier ones are
answered; each latency counts from the request's *due* time (no coordinated
omission), and requests still unanswered ``drain_s`` after the window count as
unfinished (their latency is then at least the drain wait).

The pipeline side sends through :class:`~pipeline.client.InferenceClient` (one
reply topic, futures per id); the HTTP side through one aiohttp session.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from pipeline.client import InferenceClient

TICK_S = 0.002


@dataclass
class LoadResult:
    """What one load run measured."""

    mode: str
    seconds: float
    concurrency: int = 0
    offered_rps: float = 0.0
    sent: int = 0
    completed: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    unfinished: int = 0
    throughput_rps: float = 0.0
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    mean_batch_size: float = 0.0

    def finish(self, latencies_ms: list[float], batch_sizes: list[int]) -> LoadResult:
        """Fill in the percentiles and the rate from the raw figures."""
        if latencies_ms:
            arr = np.asarray(latencies_ms, dtype=np.float64)
            self.p50_ms, self.p90_ms, self.p99_ms = (
                float(v) for v in np.percentile(arr, [50, 90, 99]))
            self.max_ms = float(arr.max())
        self.throughput_rps = self.ok / self.seconds if self.seconds > 0 else 0.0
        self.mean_batch_size = float(np.mean(batch_sizes)) if batch_sizes else 0.0
        return self


# A sender takes the request number and returns (status, batch size) once answered.
Sender = Callable[[int], "asyncio.Future[tuple[str, int]] | Any"]


def pipeline_sender(
    client: InferenceClient, make_request: Callable[[int], dict[str, Any]]
) -> Callable[[int], Any]:
    """Send request ``i`` through the pipeline; awaiting the result gives (status, batch)."""

    async def send(i: int) -> tuple[str, int]:
        fut = await client.submit(make_request(i))
        resp = await fut
        return resp.status, resp.batch_size

    return send


def http_sender(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes]
) -> Callable[[int], Any]:
    """POST body ``i % len(bodies)`` to ``url``; (status, batch size) from the answer."""

    async def send(i: int) -> tuple[str, int]:
        async with session.post(url, data=bodies[i % len(bodies)],
                                headers={"content-type": "application/json"}) as resp:
            if resp.status != 200:
                await resp.read()
                return f"http_{resp.status}", 0
            answer = await resp.json(content_type=None)
            return str(answer.get("status", "ok")), int(answer.get("batch_size", 0))

    return send


def http_session(limit: int) -> aiohttp.ClientSession:
    """One session with up to ``limit`` connections (0: no limit)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=120),
    )


async def closed_loop(
    send: Callable[[int], Any], *, concurrency: int, seconds: float, warmup_s: float,
) -> LoadResult:
    """``concurrency`` workers back to back for ``warmup_s + seconds``; the window counts."""
    counter = itertools.count()
    perf = time.perf_counter
    start = perf()
    window_start = start + warmup_s
    window_end = window_start + seconds
    latencies: list[float] = []
    batches: list[int] = []
    result = LoadResult(mode="closed", seconds=seconds, concurrency=concurrency)

    async def worker() -> None:
        while True:
            t0 = perf()
            if t0 >= window_end:
                return
            i = next(counter)
            try:
                status, batch = await send(i)
            except Exception as exc:
                status, batch = f"client_error:{type(exc).__name__}", 0
            t1 = perf()
            if t0 >= window_start and t1 <= window_end:
                result.completed += 1
                if status == "ok":
                    result.ok += 1
                    latencies.append((t1 - t0) * 1000)
                    batches.append(batch)
                else:
                    result.errors[status] = result.errors.get(status, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.sent = next(counter)
    return result.finish(latencies, batches)


async def open_loop(
    send: Callable[[int], Any], *, rate: float, seconds: float, drain_s: float = 10.0,
    first: int = 0,
) -> LoadResult:
    """Requests due at ``rate`` per second for ``seconds``; latency from each due time."""
    perf = time.perf_counter
    result = LoadResult(mode="open", seconds=seconds, offered_rps=rate)
    latencies: list[float] = []
    batches: list[int] = []
    tasks: set[asyncio.Task[None]] = set()
    total = int(rate * seconds)
    start = perf()

    async def one(i: int, due: float) -> None:
        try:
            status, batch = await send(first + i)
        except Exception as exc:
            status, batch = f"client_error:{type(exc).__name__}", 0
        result.completed += 1
        if status == "ok":
            result.ok += 1
            latencies.append((perf() - due) * 1000)
            batches.append(batch)
        else:
            result.errors[status] = result.errors.get(status, 0) + 1

    sent = 0
    while sent < total:
        due_now = min(total, int((perf() - start) * rate) + 1)
        while sent < due_now:
            task = asyncio.create_task(one(sent, start + sent / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(TICK_S)
    result.sent = sent
    window_end = perf()
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        result.unfinished = len(pending)
        # An unfinished request waited at least until now: count it so, rather than
        # leaving it out of the tail.
        latencies.extend([(perf() - window_end + seconds) * 1000] * len(pending))
    # Completions after the window still belong to this offered load; the rate is
    # what was answered ok over the time it took to answer it.
    result.seconds = max(perf() - start, seconds) if not result.unfinished else seconds
    return result.finish(latencies, batches)
