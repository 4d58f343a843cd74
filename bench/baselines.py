"""The transport and naive baselines: raw aiokafka one hop, and naive Faust agents.

Each runs through the same embedded broker as the pipeline, with the same request
bytes, and returns its figures as the pipeline's measurement does.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.processes import log_tail, stop_process
from bench.burst import (
    DRAIN_TIMEOUT_S,
    MODEL,
    Burst,
    CpuMeter,
    digits_requests,
    fresh_prefix,
    ready_burst,
)
from pipeline.client import InferenceClient
from pipeline.outbox import new_producer
from pipeline.settings import Settings
from pipeline.topics import ensure_topics

ROOT = Path(__file__).resolve().parent.parent
NAIVE_AGENT = ROOT / "bench" / "naive_agent.py"


# --------------------------------------------------------------------------- 3. aiokafka


async def measure_aiokafka_hop(
    base: Settings, bootstrap: str, x: np.ndarray[Any, Any], n: int, warmup: int,
    broker_pid: int | None,
) -> dict[str, Any]:
    """One producer -> one topic -> one consumer (no group), the pipeline's producer knobs."""
    prefix = fresh_prefix("hop")
    s = base.model_copy(update={"topic_prefix": prefix})
    topic = f"{prefix}.hop"
    await ensure_topics(s, bootstrap, [topic], partitions=s.partitions)
    reply_to = f"{prefix}.responses.bench"

    def records(count: int, tag: str) -> list[tuple[bytes, bytes]]:
        return [
            (r["id"].encode(), orjson.dumps(r))
            for r in digits_requests(x, count, tag, reply_to=reply_to)
        ]

    warm_records = records(warmup, "hop-warm")
    measured = records(n, "hop")
    producer = new_producer(s, bootstrap, client_id=f"{prefix}-producer")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=10,
        max_partition_fetch_bytes=max(s.max_request_bytes * 2, 1_048_576),
    )
    await producer.start()
    try:
        await consumer.start()
        parts = sorted(await producer.partitions_for(topic))
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)

        async def consume(count: int) -> float:
            got = 0
            while got < count:
                batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
                for recs in batches.values():
                    got += len(recs)
            return time.perf_counter()

        async def one_round(recs: list[tuple[bytes, bytes]]) -> tuple[float, float]:
            reader = asyncio.create_task(consume(len(recs)))
            first = time.perf_counter()
            deliveries = [await producer.send(topic, value, key=key) for key, value in recs]
            last = await asyncio.wait_for(reader, DRAIN_TIMEOUT_S)
            await asyncio.gather(*deliveries)
            return first, last

        if warm_records:
            await one_round(warm_records)
        cpu = CpuMeter({"bench_process": None, "broker": broker_pid})
        cpu.start()
        first, last = await one_round(measured)
        cpu_s, busy = cpu.stop()
    finally:
        await consumer.stop()
        await producer.stop()
    seconds = last - first
    return {
        "records": n,
        "seconds": seconds,
        "throughput_rps": n / seconds if seconds > 0 else 0.0,
        "partitions": len(parts),
        "record_bytes_mean": statistics.fmean(len(v) for _, v in measured) if measured else 0.0,
        "linger_ms": s.linger_ms,
        "max_batch_size": s.producer_batch_bytes,
        "warmup_records": warmup,
        "cpu_s": cpu_s,
        "cpu_us_per_record": {k: v / n * 1e6 for k, v in cpu_s.items()} if n else {},
        "machine_busy_share": busy,
    }


# --------------------------------------------------------------------------- 4. naive Faust


async def measure_naive_faust(
    base: Settings, bootstrap: str, x: np.ndarray[Any, Any], model_path: Path,
    n: int, warmup: int, logs: Path, state: Path, broker_pid: int | None,
) -> Burst:
    """The naive per-message Faust agent as its own process; same client, same requests."""
    prefix = fresh_prefix("naive")
    s = base.model_copy(update={"topic_prefix": prefix})
    # The input topic first, with the configured partitions, before Faust could declare it.
    await ensure_topics(s, bootstrap, [s.topic("requests")], partitions=s.partitions)
    env = {
        **os.environ,
        "NAIVE_BROKER": bootstrap,
        "NAIVE_INPUT_TOPIC": s.topic("requests"),
        "NAIVE_MODEL_PATH": str(model_path),
        "NAIVE_APP_ID": f"{prefix}-agent",
        "NAIVE_STATE_DIR": str(state / prefix),
        "NAIVE_PARTITIONS": str(s.partitions),
    }
    return await _burst_through_naive(
        s, bootstrap, x, n, warmup, broker_pid, "naive",
        {"agent": (env, logs / "naive-agent.log")})


async def measure_naive_router_worker(
    base: Settings, bootstrap: str, x: np.ndarray[Any, Any], model_path: Path,
    n: int, warmup: int, logs: Path, state: Path, broker_pid: int | None,
) -> Burst:
    """A naive Faust router and a naive Faust worker, each its own process."""
    prefix = fresh_prefix("naive2")
    s = base.model_copy(update={"topic_prefix": prefix})
    lane = s.lane_topic(MODEL, "normal")
    # Both topics first, with the configured partitions, before Faust could declare them.
    await ensure_topics(s, bootstrap, [s.topic("requests"), lane], partitions=s.partitions)
    common = {
        **os.environ,
        "NAIVE_BROKER": bootstrap,
        "NAIVE_INPUT_TOPIC": s.topic("requests"),
        "NAIVE_LANE_TOPIC": lane,
        "NAIVE_MODEL_PATH": str(model_path),
        "NAIVE_PARTITIONS": str(s.partitions),
    }
    return await _burst_through_naive(
        s, bootstrap, x, n, warmup, broker_pid, "naive2",
        {role: ({**common, "NAIVE_ROLE": role, "NAIVE_APP_ID": f"{prefix}-{role}",
                 "NAIVE_STATE_DIR": str(state / f"{prefix}-{role}")},
                logs / f"naive-{role}.log")
         for role in ("router", "worker")})


async def _burst_through_naive(
    s: Settings, bootstrap: str, x: np.ndarray[Any, Any], n: int, warmup: int,
    broker_pid: int | None, tag: str, processes: dict[str, tuple[dict[str, str], Path]],
) -> Burst:
    """Start each named naive process (its environment, its log), then the measured burst.

    The processes are stopped on the way out, whatever happened.
    """
    procs: dict[str, asyncio.subprocess.Process] = {}

    def tail(name: str) -> str:
        return log_tail(processes[name][1])

    def alive() -> str | None:
        for name, proc in procs.items():
            if proc.returncode is not None:
                return f"naive {name} exited with {proc.returncode}:\n{tail(name)}"
        return None

    def describe() -> str:
        return "\n".join(f"--- naive {name}:\n{tail(name)}" for name in processes)

    try:
        for name, (env, log_path) in processes.items():
            procs[name] = await _start_naive(env, log_path)
        async with InferenceClient(
            s, bootstrap_servers=bootstrap, max_in_flight=max(n, warmup, 1)
        ) as client:
            return await ready_burst(
                client, x, n, warmup, tag,
                {"bench_client": None, "broker": broker_pid,
                 **{name: proc.pid for name, proc in procs.items()}},
                alive, describe, s.topic_prefix)
    finally:
        for proc in procs.values():
            await stop_process(proc)


async def _start_naive(env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    """``bench/naive_agent.py`` as a worker process of its own, logging to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, str(NAIVE_AGENT), "worker", "--without-web", "-l", "warn",
            env=env, cwd=str(ROOT), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True,
        )
