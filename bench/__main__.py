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
   at Ray Serve's offered rates (Ray Serve runs first), to compare at equal load,
   each of its points on a pipeline of its own (see :func:`open_points`).

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agents.processes import log_tail, stop_process  # noqa: E402
from bench import loadgen, prepare_process, results  # noqa: E402
from bench.baselines import measure_aiokafka_hop, measure_naive_faust  # noqa: E402
from bench.burst import BenchError, CpuMeter, digits_requests, run_burst  # noqa: E402
from bench.minilm_cycles import best_sizes, dedicated_cycles, minilm_cycles  # noqa: E402
from bench.sparse import sparse_beside_job  # noqa: E402
from bench.suite import (  # noqa: E402
    OUT_DIR,
    QUIET_POOL_S,
    Plan,
    digits_batch,
    fleet,
    minilm_batch,
    pooled_jobs,
    raw_onnxruntime,
    step,
    timed_job,
)
from pipeline.broker import EmbeddedBroker, free_port  # noqa: E402
from pipeline.client import InferenceClient  # noqa: E402
from pipeline.errors import InferlineError  # noqa: E402
from pipeline.modelstore import ensure_models, load_heldout  # noqa: E402
from pipeline.registry import ModelVersion, Registry  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

RAY_APP = ROOT / "bench" / "ray_serve_app.py"


async def pipeline_runs(plan: Plan, base: Settings, bootstrap: str, logs: Path,
                        broker_pid: int | None, also_at: tuple[float, ...]) -> dict[str, Any]:
    """Digits burst, closed and open loop and bulk jobs through one pipeline."""
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
            closed = await closed_point(plan, "pipeline", send)
        out["digits_jobs"] = await digits_jobs(plan, s, bootstrap, pids, x)
        out["digits_sparse"] = await sparse_beside_job(
            plan, s, bootstrap, pids, x,
            out["digits_jobs"]["rows_per_request_16"]["throughput_rps"])

    @contextlib.asynccontextmanager
    async def fresh_pipeline() -> AsyncIterator[Any]:
        async with fleet(base, bootstrap, ["digits"], logs, broker_pid) as (fs, _):
            async with InferenceClient(fs, bootstrap_servers=bootstrap,
                                       max_in_flight=big) as fresh_client:
                yield loadgen.pipeline_sender(fresh_client, make)

    out.update(await open_points(plan, closed, fresh_pipeline, also_at))
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
        await timed_job(s, bootstrap, Path(tmp), "dwarm", lines[: max(n // 10, 1)], pids,
                         model="digits")
        for i, k in enumerate((16, 1, 1, 16)):
            step(f"pipeline digits bulk job: {n} rows, {k} per request")
            job = await timed_job(s, bootstrap, Path(tmp), f"d{k}-{i}", lines, pids,
                                   model="digits", rows_per_request=k)
            step(f"    {job['throughput_rps']:,.0f} rows/s, ok {job['ok_share']:.1%}, "
                 f"state {job['state']}")
            runs[k].append(job)
    return {f"rows_per_request_{k}": pooled_jobs(done) for k, done in runs.items()}


async def load_curve(plan: Plan, name: str, send: Any, also_at: tuple[float, ...] = ()
                     ) -> dict[str, Any]:
    """Closed loop at the plan's concurrency, then open loop at fractions of that rate.

    ``also_at``: more offered rates (another system's), so that both can be compared
    at equal load. Every point goes to the same ``send``.
    """
    closed = await closed_point(plan, name, send)

    @contextlib.asynccontextmanager
    async def same() -> AsyncIterator[Any]:
        yield send

    return await open_points(plan, closed, same, also_at, name=name)


async def closed_point(plan: Plan, name: str, send: Any) -> loadgen.LoadResult:
    """The closed loop at the plan's concurrency."""
    step(f"{name} closed loop: {plan.concurrency} concurrent for {plan.closed_seconds:.0f}s")
    closed = await loadgen.closed_loop(send, concurrency=plan.concurrency,
                                       seconds=plan.closed_seconds, warmup_s=1.0)
    step(f"    {closed.throughput_rps:,.0f} req/s, p50 {closed.p50_ms:.1f} ms, "
         f"p99 {closed.p99_ms:.1f} ms, mean batch {closed.mean_batch_size:.1f}")
    return closed


async def open_points(plan: Plan, closed: loadgen.LoadResult,
                      sender: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
                      also_at: tuple[float, ...] = (), *, name: str = "pipeline"
                      ) -> dict[str, Any]:
    """Open loop at fractions of the closed loop's rate (and ``also_at``), each point
    sent through what ``sender()`` yields.

    The pipeline gives each point a pipeline of its own (new topics, router and
    worker): the embedded broker's cost per fetch and produce grows with the record
    batches its partitions hold, so a curve measured on one set of topics, after a
    burst and a closed loop, would charge each point the history before it (measured:
    digits at 442 req/s, p50 30 ms on new topics and 110 ms after 7,000 more records).
    """
    points = []
    first = 10_000_000
    rates = {round(max(closed.throughput_rps * f, 10.0), 1): f"{f:.0%}" for f in plan.fractions}
    for rate in also_at:
        rates.setdefault(rate, "the peer's rate")
    for rate in sorted(rates):
        async with sender() as send:
            r = await loadgen.open_loop(send, rate=rate, seconds=plan.open_seconds, first=first)
        first += r.sent + 1
        step(f"    {name} open loop {rate:,.0f}/s ({rates[rate]}): {r.throughput_rps:,.0f} "
             f"ok/s, p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, unfinished {r.unfinished}")
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
            raise BenchError(f"Ray Serve did not start (exit {proc.returncode}):\n"
                             f"{log_tail(log_path, 30)}")
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
        await stop_process(proc, grace_s=60)


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
            raw_onnxruntime, registry.resolve("digits"), digits_batch(x),
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
            plan = plan.sized_for(res["ort_minilm"]["best_rows_per_s"])
            res["plan"] = asdict(plan)
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
            res["pipeline"] = await pipeline_runs(plan, base, bootstrap, logs, broker.pid,
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
        ort_minilm = res.get("ort_minilm")
        if ort_minilm is not None:
            # Each cycle starts a broker of its own (see bench.minilm_cycles.minilm_run).
            res["pipeline"]["minilm_burst"] = await minilm_cycles(plan, base, logs, ort_minilm)
            res["pipeline"]["minilm_dedicated"] = await dedicated_cycles(
                plan, base, logs, best_sizes(ort_minilm))

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
