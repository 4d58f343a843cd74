"""Soak: the pipeline at half its measured capacity for a long while.

``python bench/soak.py [--seconds 600] [--fraction 0.5]`` builds ``digits``,
starts one embedded broker, a router and a worker process, measures capacity
with a burst, then offers ``fraction`` of it, paced, for ``--seconds``. It
prints throughput, client-observed p50/p99, the share answered ok, and each
process's resident memory at the end over its memory after warm-up (target:
at most 1.1).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from agents.processes import ServeProcess  # noqa: E402
from agents.serve import prepare_topics  # noqa: E402
from bench import prepare_process  # noqa: E402
from bench.burst import digits_requests, run_burst, wait_ready  # noqa: E402
from pipeline.broker import EmbeddedBroker  # noqa: E402
from pipeline.client import InferenceClient  # noqa: E402
from pipeline.modelstore import ensure_models, load_heldout  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

MODEL = "digits"
TICK_S = 0.01


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def paced(
    client: InferenceClient, x: np.ndarray[Any, Any], rate: float, seconds: float, tag: str
) -> dict[str, Any]:
    """Offer ``rate`` requests/s for ``seconds``; every response's latency is recorded."""
    rows = [x[i].tolist() for i in range(len(x))]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    pending: set[asyncio.Future[Any]] = set()

    def done(sent: float) -> Any:
        def _cb(fut: asyncio.Future[Any]) -> None:
            pending.discard(fut)
            if fut.cancelled() or fut.exception() is not None:
                statuses["client_error"] = statuses.get("client_error", 0) + 1
                return
            resp = fut.result()
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            latencies.append((time.perf_counter() - sent) * 1000)

        return _cb

    start = time.perf_counter()
    sent = 0
    while (now := time.perf_counter()) - start < seconds:
        due = int((now - start) * rate)
        while sent < due:
            req = {"id": f"{tag}-{sent}", "model": MODEL, "inputs": [
                {"name": "input", "shape": [1, 64], "datatype": "FP32",
                 "data": rows[sent % len(rows)]}]}
            fut = await client.submit(req)
            pending.add(fut)
            fut.add_done_callback(done(time.perf_counter()))
            sent += 1
        await asyncio.sleep(TICK_S)
    offered_s = time.perf_counter() - start
    if pending:
        await asyncio.wait(list(pending), timeout=60)
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {
        "sent": sent, "offered_rps": sent / offered_s, "answered": len(latencies),
        "ok_share": statuses.get("ok", 0) / sent if sent else 0.0, "statuses": statuses,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "throughput_rps": len(latencies) / (time.perf_counter() - start),
    }


async def run(args: argparse.Namespace) -> int:
    """The soak; returns a process exit status (1 if the memory target is missed)."""
    tmp = Path(tempfile.mkdtemp(prefix="inferline-soak-"))
    model_dir = Path(args.model_dir) if args.model_dir else tmp / "models"
    s = Settings(model_dir=model_dir, state_dir=tmp / "state", topic_prefix="soak",
                 bootstrap_servers=None)
    await asyncio.to_thread(ensure_models, model_dir, models=["digits"])
    x, _ = load_heldout(model_dir)
    async with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        await prepare_topics(s, bootstrap, [MODEL])
        procs = [ServeProcess(s, bootstrap, role, worker_id=f"soak-{role}")
                 for role in ("router", "worker")]
        for p in procs:
            await p.start()
        try:
            async with InferenceClient(s, bootstrap_servers=bootstrap,
                                       max_in_flight=100_000) as client:
                def alive() -> str | None:
                    dead = [p for p in procs if p.returncode is not None]
                    return f"{dead[0].role} exited:\n{dead[0].tail()}" if dead else None

                await wait_ready(client, x, alive, lambda: "\n".join(p.tail() for p in procs))
                burst = await run_burst(client, digits_requests(x, args.capacity_requests,
                                                                "capacity"))
                capacity = burst.throughput_rps
                rate = capacity * args.fraction
                print(f"[soak] capacity {capacity:,.0f} req/s; offering {rate:,.0f} req/s "
                      f"for {args.seconds:.0f}s", flush=True)
                await paced(client, x, rate, args.warmup_seconds, "soak-warm")
                pids = {p.role: p.proc.pid for p in procs if p.proc is not None}
                after_warmup = {role: rss_mb(pid) for role, pid in pids.items()}
                result = await paced(client, x, rate, args.seconds, "soak")
                at_end = {role: rss_mb(pid) for role, pid in pids.items()}
        finally:
            for p in procs:
                await p.stop()
    growth = {role: at_end[role] / after_warmup[role] for role in at_end}
    print(f"sent {result['sent']:,} at {result['offered_rps']:,.0f} req/s offered; "
          f"answered {result['answered']:,}, ok share {result['ok_share']:.4f} "
          f"{result['statuses']}")
    for role in at_end:
        print(f"rss {role}: {after_warmup[role]:.1f} MB after warm-up -> {at_end[role]:.1f} MB")
    print(f"throughput {result['throughput_rps']:,.0f} req/s "
          f"({result['throughput_rps'] / capacity:.3f} of measured capacity)")
    print(f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms")
    worst = max(growth.values())
    for role, g in growth.items():
        print(f"ratio rss_end/rss_after_warmup {role} = {g:.3f} (target <= 1.1)")
    return 0 if worst <= 1.1 and result["ok_share"] == 1.0 else 1


def main() -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600.0, help="soak length (default 600)")
    p.add_argument("--fraction", type=float, default=0.5, help="share of capacity to offer")
    p.add_argument("--warmup-seconds", type=float, default=30.0)
    p.add_argument("--capacity-requests", type=int, default=20_000)
    p.add_argument("--model-dir", default=None)
    args = p.parse_args()
    prepare_process()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
