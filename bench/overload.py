"""Overload: twice the measured capacity, priority lanes against a FIFO single lane.

``python bench/overload.py [--seconds 60] [--models digits,minilm] [--factor 2]``

For each model (``digits``, and ``minilm`` when it is in the registry: a model
whose compute dominates), on one embedded broker:

1. capacity: a closed burst of normal-priority requests through a router and a
   worker, answered per second;
2. for each scheduling mode (``priority``, then the ``fifo`` baseline, fresh
   topics and processes each): offered load at ``factor`` x capacity, open
   loop, for ``seconds``, mixed 20% high / 50% normal / 30% batch. High requests
   carry ``timeout_ms`` = ``--high-timeout-ms``, normal ones
   ``--normal-timeout-ms``, batch ones none.

Per mode it prints high-priority p99 (ok answers, producer send to the
collector's receipt) over the model's ``slo_p99_ms``, the share of
high-priority requests answered ok, the batch lane's share of the ok answers
in the window, and how the rest were answered. The generator produces
pre-serialised requests (no per-request futures) and the collector stores raw
responses, parsed after the run, so the load generator itself costs little.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import orjson  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from agents.processes import ServeProcess  # noqa: E402
from agents.serve import prepare_topics  # noqa: E402
from bench.burst import percentile  # noqa: E402
from pipeline.broker import EmbeddedBroker  # noqa: E402
from pipeline.modelstore import ensure_models, load_heldout  # noqa: E402
from pipeline.outbox import Outbox, PartitionCache  # noqa: E402
from pipeline.registry import Registry  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.tasks import cancel_and_wait  # noqa: E402
from pipeline.topics import ensure_topics  # noqa: E402

OUT_DIR = ROOT / "bench" / "out"
MIX = (("high", 0.2), ("normal", 0.5), ("batch", 0.3))
# The generator sends what is due every 20 ms, as producers lingering 20 ms would: with
# 5-ms batches the embedded broker's CPU, and every hop's latency, climbed through a run
# (its fetches grow dearer as a partition fills); with larger batches they stayed flat.
TICK_S = 0.02


@dataclass
class ModeResult:
    """What one scheduling mode achieved under the offered load."""

    mode: str
    offered_rps: float = 0.0
    sent: int = 0
    seconds: float = 0.0
    slo_ms: float = 0.0
    high_p99_ms: float = 0.0
    high_p50_ms: float = 0.0
    high_ok_share: float = 0.0
    batch_share_of_ok: float = 0.0
    ok_rps: float = 0.0
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)
    unanswered_after_drain: int = 0
    high_queue_p50_ms: float = 0.0
    high_batch_wait_p50_ms: float = 0.0
    high_queue_p99_ms: float = 0.0
    high_server_p99_ms: float = 0.0
    high_p99_by_second_ms: list[int] = field(default_factory=list)


def payloads(model: str, x: np.ndarray[Any, Any] | None, n: int = 64) -> list[bytes]:
    """JSON fragments for ``inputs`` of one single-row request, cycled over."""
    if model == "digits":
        assert x is not None
        return [orjson.dumps([{"name": "input", "shape": [1, 64], "datatype": "FP32",
                               "data": x[i % len(x)].tolist()}]) for i in range(n)]
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "A fast, dark-coloured fox leaps above a sleepy hound.",
        "Stock markets fell sharply after the central bank raised interest rates.",
        "How do I reset my password if I no longer have access to my email?",
        "Kafka topics carry inference requests to workers that batch them.",
        "The weather tomorrow will be sunny with a light breeze from the west.",
        "She sold the old piano to a collector who restores instruments.",
        "Batching many small requests into one model call raises throughput.",
    ]
    return [orjson.dumps([{"name": "text", "shape": [1], "datatype": "BYTES",
                           "data": [texts[i % len(texts)]]}]) for i in range(n)]


def request_bytes(rid: str, model: str, priority: str, timeout_ms: int | None,
                  reply_to: str, inputs: bytes) -> bytes:
    """One request, built from pre-serialised parts."""
    head: dict[str, str | int] = {"id": rid, "model": model, "priority": priority,
                                  "reply_to": reply_to}
    if timeout_ms is not None:
        head["timeout_ms"] = timeout_ms
    return orjson.dumps(head)[:-1] + b',"inputs":' + inputs + b"}"


class Collector:
    """Reads a reply topic, keeping raw values and receipt times for later parsing."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.got: list[tuple[float, bytes]] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            self.topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
            enable_auto_commit=False, fetch_max_wait_ms=10, max_partition_fetch_bytes=8 << 20,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=10_000)
            now = time.time()
            for recs in batches.values():
                self.got.extend((now, r.value) for r in recs)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._consumer is not None:
            await self._consumer.stop()


class Generator:
    """Open-loop producer of pre-serialised requests at a fixed rate."""

    def __init__(self, settings: Settings, bootstrap: str) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.sent_at: dict[str, float] = {}
        self.priority_of: dict[str, str] = {}
        self.producer: AIOKafkaProducer | None = None
        self.partitions: PartitionCache | None = None

    async def start(self) -> None:
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, linger_ms=2, max_batch_size=1 << 20,
            max_request_size=8 << 20,
        )
        await self.producer.start()
        self.partitions = PartitionCache(self.producer)

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()

    async def run(self, *, model: str, rate_rps: float, seconds: float | None, count: int | None,
                  inputs: list[bytes], reply_to: str, mix: Sequence[tuple[str, float]],
                  timeouts: dict[str, int | None], tag: str) -> tuple[int, float]:
        """Send at ``rate_rps`` for ``seconds`` (or ``count`` requests as fast as possible)."""
        assert self.producer is not None and self.partitions is not None
        topic = self.settings.topic("requests")
        rng = np.random.default_rng(7)
        names = [p for p, _ in mix]
        probs = np.asarray([w for _, w in mix])
        plan = rng.choice(len(names), size=(count or int(rate_rps * (seconds or 0)) + 1), p=probs)
        start = time.perf_counter()
        sent = 0
        total = len(plan)
        while sent < total:
            if count is None:
                due = min(total, int((time.perf_counter() - start) * rate_rps))
            else:
                due = min(total, sent + 2_000)
            if due > sent:
                outbox = Outbox(self.producer, self.partitions)
                now = time.time()
                for i in range(sent, due):
                    priority = names[plan[i]]
                    rid = f"{tag}-{priority[0]}-{i}"
                    self.sent_at[rid] = now
                    self.priority_of[rid] = priority
                    outbox.add(topic, rid.encode(), request_bytes(
                        rid, model, priority, timeouts.get(priority), reply_to,
                        inputs[i % len(inputs)]))
                sent = due
                await outbox.flush()
            elif count is None:
                await asyncio.sleep(TICK_S)
            if count is None and time.perf_counter() - start > (seconds or 0):
                break
        return sent, time.perf_counter() - start


def analyse(gen: Generator, got: list[tuple[float, bytes]], window_end: float,
            mode: str, slo_ms: float) -> ModeResult:
    """Statuses per priority, high-priority latency, batch share of ok answers."""
    r = ModeResult(mode=mode, slo_ms=slo_ms)
    high_lat: list[float] = []
    high_queue: list[float] = []
    high_wait: list[float] = []
    high_sent: list[float] = []
    high_total: list[float] = []
    ok_in_window = {p: 0 for p, _ in MIX}
    seen: set[str] = set()
    for received, raw in got:
        resp = orjson.loads(raw)
        rid = resp.get("id")
        if rid not in gen.priority_of or rid in seen:
            continue
        seen.add(rid)
        priority = gen.priority_of[rid]
        status = resp["status"]
        by = r.statuses.setdefault(priority, {})
        code = status if status == "ok" else f"{status}:{(resp.get('error') or {}).get('code')}"
        by[code] = by.get(code, 0) + 1
        if status == "ok":
            if received <= window_end:
                ok_in_window[priority] += 1
            if priority == "high":
                high_lat.append((received - gen.sent_at[rid]) * 1000)
                high_sent.append(gen.sent_at[rid])
                timing = resp.get("timing") or {}
                high_queue.append(timing.get("queue_ms", 0.0))
                high_wait.append(timing.get("batch_wait_ms", 0.0))
                high_total.append(timing.get("total_ms", 0.0))
    highs = sum(1 for p in gen.priority_of.values() if p == "high")
    r.high_p99_ms = percentile(high_lat, 99)
    r.high_p50_ms = percentile(high_lat, 50)
    r.high_queue_p50_ms = percentile(high_queue, 50)
    r.high_batch_wait_p50_ms = percentile(high_wait, 50)
    r.high_queue_p99_ms = percentile(high_queue, 99)
    r.high_server_p99_ms = percentile(high_total, 99)
    r.high_ok_share = len(high_lat) / highs if highs else 0.0
    if high_sent:
        # The tail over time: p99 of the high requests sent in each second of the run.
        t0 = min(high_sent)
        per_s: dict[int, list[float]] = {}
        for sent, lat in zip(high_sent, high_lat, strict=True):
            per_s.setdefault(int(sent - t0), []).append(lat)
        r.high_p99_by_second_ms = [round(percentile(per_s[k], 99)) for k in sorted(per_s)]
    total_ok = sum(ok_in_window.values())
    r.batch_share_of_ok = ok_in_window["batch"] / total_ok if total_ok else 0.0
    r.unanswered_after_drain = len(gen.priority_of) - len(seen)
    return r


async def start_pipeline(base: Settings, bootstrap: str, model: str, mode: str,
                         logs: Path, routers: int = 1) -> tuple[Settings, list[ServeProcess]]:
    prefix = f"ovl-{mode}-{uuid.uuid4().hex[:6]}"
    s = base.model_copy(update={"topic_prefix": prefix, "scheduling": mode})
    await prepare_topics(s, bootstrap, [model])
    roles = [*(["router"] * routers), "worker"]
    procs = [
        ServeProcess(s, bootstrap, role, models=[model] if role == "worker" else None,
                     worker_id=f"{prefix}-{role}{i}", log_path=logs / f"{prefix}-{role}{i}.log")
        for i, role in enumerate(roles)
    ]
    for p in procs:
        await p.start()
    return s, procs


async def probe(s: Settings, bootstrap: str, model: str, inputs: list[bytes]) -> None:
    """Wait until the pipeline answers (groups formed, model warm)."""
    reply = f"{s.topic_prefix}.responses.probe"
    await ensure_topics(s, bootstrap, [reply], partitions=1)
    col = Collector(bootstrap, reply)
    gen = Generator(s, bootstrap)
    await col.start()
    await gen.start()
    try:
        for attempt in range(60):
            await gen.run(model=model, rate_rps=0, seconds=None, count=1, inputs=inputs,
                          reply_to=reply, mix=[("normal", 1.0)], timeouts={},
                          tag=f"probe{attempt}")
            for _ in range(30):
                await asyncio.sleep(0.1)
                if col.got:
                    return
        raise RuntimeError(f"{model} pipeline did not answer within the probe window")
    finally:
        await gen.stop()
        await col.stop()


async def drive(s: Settings, bootstrap: str, *, model: str, inputs: list[bytes],
                rate: float, seconds: float | None, count: int | None,
                mix: Sequence[tuple[str, float]], timeouts: dict[str, int | None],
                drain_s: float) -> tuple[Generator, list[tuple[float, bytes]], float, int, float]:
    reply = f"{s.topic_prefix}.responses.bench-{uuid.uuid4().hex[:6]}"
    await ensure_topics(s, bootstrap, [reply], partitions=s.partitions)
    col = Collector(bootstrap, reply)
    gen = Generator(s, bootstrap)
    await col.start()
    await gen.start()
    # Hundreds of thousands of kept responses would make each full collection pause the
    # generator and the collector for a noticeable time: their pauses, not the pipeline's,
    # would show in the measured tail. Nothing kept here forms reference cycles.
    gc.collect()
    gc.disable()
    probe_lat: list[tuple[float, float]] = []
    probe_topic = f"{s.topic_prefix}.probe-{uuid.uuid4().hex[:6]}"
    await ensure_topics(s, bootstrap, [probe_topic], partitions=1)

    async def probe_broker() -> None:
        # The broker's own responsiveness through the run: one tiny acked write per 50 ms.
        assert gen.producer is not None
        while True:
            t0 = time.perf_counter()
            await gen.producer.send_and_wait(probe_topic, b"p")
            probe_lat.append((time.time(), (time.perf_counter() - t0) * 1000))
            await asyncio.sleep(0.05)

    prober = asyncio.create_task(probe_broker() if count is None else asyncio.sleep(0))
    try:
        sent, took = await gen.run(model=model, rate_rps=rate, seconds=seconds, count=count,
                                   inputs=inputs, reply_to=reply, mix=mix, timeouts=timeouts,
                                   tag=uuid.uuid4().hex[:6])
        window_end = time.time()
        await cancel_and_wait(prober)
        if probe_lat and count is None:
            t0 = probe_lat[0][0]
            per: dict[int, float] = {}
            for t, lat in probe_lat:
                per[int(t - t0)] = max(per.get(int(t - t0), 0.0), lat)
            print("broker probe: max acked-write ms per second:",
                  [round(per[k]) for k in sorted(per)], flush=True)
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and len(col.got) < sent:  # noqa: ASYNC110 - polls a list
            await asyncio.sleep(0.2)
        return gen, list(col.got), window_end, sent, took
    finally:
        gc.enable()
        await gen.stop()
        await col.stop()


async def measure_capacity(base: Settings, bootstrap: str, model: str, inputs: list[bytes],
                           n: int, logs: Path, routers: int = 1) -> float:
    s, procs = await start_pipeline(base, bootstrap, model, "priority", logs, routers)
    try:
        await probe(s, bootstrap, model, inputs)
        _, got, _, _, _ = await drive(
            s, bootstrap, model=model, inputs=inputs, rate=0, seconds=None, count=n,
            mix=[("normal", 1.0)], timeouts={}, drain_s=300)
        times = sorted(t for t, _ in got)
        lo, hi = times[len(times) // 10], times[(len(times) * 9) // 10]
        return ((len(times) * 9) // 10 - len(times) // 10) / (hi - lo)
    finally:
        for p in procs:
            await p.stop()


async def run_model(args: argparse.Namespace, base: Settings, bootstrap: str, model: str,
                    x: np.ndarray[Any, Any], logs: Path) -> dict[str, Any]:
    registry = Registry.load(base.registry_path)
    spec = registry.resolve(model)
    inputs = payloads(model, x)
    n_cap = args.capacity_requests or (30_000 if model == "digits" else 2_000)
    print(f"[{model}] measuring capacity with {n_cap} requests ...", flush=True)
    capacity = await measure_capacity(base, bootstrap, model, inputs, n_cap, logs, args.routers)
    rate = capacity * args.factor
    print(f"[{model}] capacity {capacity:.0f} req/s; offering {rate:.0f} req/s "
          f"for {args.seconds:.0f}s per mode", flush=True)
    timeouts = {"high": args.high_timeout_ms, "normal": args.normal_timeout_ms, "batch": None}
    results: dict[str, Any] = {"model": model, "capacity_rps": capacity, "factor": args.factor,
                               "slo_p99_ms": spec.slo_p99_ms, "modes": {}}
    for mode in args.modes.split(","):
        s, procs = await start_pipeline(base, bootstrap, model, mode, logs, args.routers)
        try:
            await probe(s, bootstrap, model, inputs)
            gen, got, window_end, sent, took = await drive(
                s, bootstrap, model=model, inputs=inputs, rate=rate, seconds=args.seconds,
                count=None, mix=MIX, timeouts=timeouts, drain_s=args.drain_seconds)
        finally:
            for p in procs:
                await p.stop()
        r = analyse(gen, got, window_end, mode, spec.slo_p99_ms)
        r.sent, r.seconds = sent, took
        r.offered_rps = sent / took if took else 0.0
        r.ok_rps = sum(v.get("ok", 0) for v in r.statuses.values()) / took if took else 0.0
        results["modes"][mode] = asdict(r)
        print(f"[{model}] {mode}: offered {r.offered_rps:.0f} req/s "
              f"({r.offered_rps / capacity:.2f}x capacity), high p99 {r.high_p99_ms:.0f} ms, "
              f"high ok {r.high_ok_share:.4f}, "
              f"batch share {r.batch_share_of_ok:.3f}; {r.statuses}; "
              f"unanswered after drain {r.unanswered_after_drain}; high p50 {r.high_p50_ms:.0f} ms "
              f"(queue {r.high_queue_p50_ms:.0f}, batch wait {r.high_batch_wait_p50_ms:.0f}); "
              f"high p99 of queue {r.high_queue_p99_ms:.0f} ms, of the worker's total "
              f"{r.high_server_p99_ms:.0f} ms; "
              f"high p99 per second of sending: {r.high_p99_by_second_ms}", flush=True)
    return results


def report(all_results: list[dict[str, Any]]) -> None:
    print("\n== overload: ratios (same run) ==")
    for res in all_results:
        m = res["model"]
        for mode in res["modes"]:
            r = res["modes"][mode]
            print(f"{m:8s} {mode:8s} offered/capacity {r['offered_rps'] / res['capacity_rps']:.2f}"
                  f"  high p99/SLO {r['high_p99_ms'] / res['slo_p99_ms']:.3f}"
                  f"  high ok share {r['high_ok_share']:.4f}"
                  f"  batch-lane share of ok {r['batch_share_of_ok']:.3f}")
        if set(res["modes"]) != {"priority", "fifo"}:
            continue
        p, f = res["modes"]["priority"], res["modes"]["fifo"]
        meets = p["high_p99_ms"] <= res["slo_p99_ms"] and p["high_ok_share"] >= 0.99
        misses = f["high_p99_ms"] > res["slo_p99_ms"] or f["high_ok_share"] < 0.99
        print(f"{m:8s} priority meets SLO and 99% ok: {meets}; fifo baseline misses: {misses}")


async def main_async(args: argparse.Namespace) -> int:
    base = Settings()
    workdir = Path(tempfile.mkdtemp(prefix="inferline-overload-"))
    base = base.model_copy(update={
        "state_dir": workdir, "session_timeout_ms": 6000, "heartbeat_interval_ms": 500,
        "rebalance_timeout_ms": 6000, "partitions": args.partitions,
        **({"intra_op_threads": args.intra_op_threads} if args.intra_op_threads else {}),
    })
    await asyncio.to_thread(ensure_models, base.model_dir)
    registry = Registry.load(base.registry_path)
    models = [m for m in args.models.split(",") if m]
    missing = [m for m in models if m not in registry.entries]
    for m in missing:
        print(f"note: {m} is not in the registry ({base.registry_path}); skipped", flush=True)
    x, _ = load_heldout(base.model_dir)
    logs = workdir / "logs"
    results = []
    async with EmbeddedBroker() as broker:
        for model in models:
            if model in missing:
                continue
            results.append(await run_model(args, base, broker.bootstrap_servers, model, x, logs))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "overload.json").write_text(json.dumps(results, indent=2))
    report(results)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits,minilm")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--high-timeout-ms", type=int, default=1000)
    p.add_argument("--normal-timeout-ms", type=int, default=2000)
    p.add_argument("--drain-seconds", type=float, default=60.0)
    p.add_argument("--capacity-requests", type=int, default=0)
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="ONNX Runtime threads per worker session (0: the settings' default)")
    p.add_argument("--partitions", type=int, default=1,
                   help="partitions of the requests, lane and reply topics (the embedded "
                        "broker's fetches cost more per partition: one is cheapest here)")
    p.add_argument("--modes", default="priority,fifo",
                   help="scheduling modes to run, in order (both for the verdict)")
    p.add_argument("--routers", type=int, default=1,
                   help="router processes (one consumer group): the stateless stage scaled out")
    return asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
