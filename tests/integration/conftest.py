"""A running pipeline (router and worker processes) shared by the integration tests."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from agents.processes import ServeProcess
from agents.serve import prepare_topics
from pipeline.broker import free_port
from pipeline.client import InferenceClient
from pipeline.errors import ClientTimeout
from pipeline.modelstore import ensure_models, load_heldout
from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Pipeline:
    """Handles on the session's pipeline."""

    settings: Settings
    bootstrap: str
    router: ServeProcess
    worker: ServeProcess
    x: np.ndarray[Any, Any]
    y: np.ndarray[Any, Any]


@pytest.fixture(scope="session")
async def pipeline_settings(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """The session settings plus a model store with the digits model built in it."""
    await asyncio.to_thread(ensure_models, settings.model_dir)
    return settings.model_copy(update={"state_dir": tmp_path_factory.mktemp("state")})


@pytest.fixture(scope="session")
async def pipeline(pipeline_settings: Settings, broker: str) -> AsyncIterator[Pipeline]:
    """Router and worker as separate `inferline serve` processes, ready to answer."""
    s = pipeline_settings
    await prepare_topics(s, broker, ["digits", "minilm"])
    router = ServeProcess(s, broker, "router", worker_id="it-router")
    worker = ServeProcess(
        s.model_copy(update={"metrics_port": free_port()}), broker, "worker", worker_id="it-worker"
    )
    await router.start()
    await worker.start()
    x, y = load_heldout(s.model_dir)
    try:
        async with InferenceClient(s, bootstrap_servers=broker) as client:
            deadline = time.monotonic() + 120
            while True:
                for p in (router, worker):
                    if p.returncode is not None:
                        pytest.fail(f"{p.role} exited with {p.returncode}:\n{p.tail()}")
                try:
                    resp = await client.infer("digits", {"input": x[:1]}, wait_timeout_ms=3000)
                    assert resp.status == "ok", resp
                    break
                except ClientTimeout:
                    if time.monotonic() > deadline:
                        pytest.fail(f"pipeline not ready:\n{router.tail()}\n{worker.tail()}")
        yield Pipeline(s, broker, router, worker, x, y)
    finally:
        codes = [await router.stop(), await worker.stop()]
    # Both roles must stop cleanly on SIGTERM (Faust's graceful shutdown).
    assert codes == [0, 0], f"exit codes {codes}:\n{router.tail()}\n{worker.tail()}"


@pytest.fixture(scope="session")
async def stats_agent(pipeline: Pipeline) -> AsyncIterator[ServeProcess]:
    """`inferline serve --role stats` on the session's pipeline, with 2-second windows."""
    s = pipeline.settings.model_copy(update={"stats_window_s": 2.0})
    proc = ServeProcess(s, pipeline.bootstrap, "stats", worker_id="it-stats")
    await proc.start()
    try:
        yield proc
    finally:
        code = await proc.stop()
    assert code == 0, f"stats agent exited with {code}:\n{proc.tail()}"


@pytest.fixture(scope="session")
async def client(pipeline: Pipeline) -> AsyncIterator[InferenceClient]:
    """One inference client for the session (its own reply topic)."""
    async with InferenceClient(pipeline.settings, bootstrap_servers=pipeline.bootstrap) as c:
        yield c


async def read_topic(bootstrap: str, topic: str, *, idle_ms: int = 1500) -> list[Any]:
    """Every record of ``topic`` from the beginning, until it has been idle for ``idle_ms``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer._client.add_topic(topic)
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list[Any] = []
        while True:
            batch = await consumer.getmany(timeout_ms=idle_ms)
            for recs in batch.values():
                records.extend(recs)
            positions = {tp: await consumer.position(tp) for tp in tps}
            if not batch and all(positions[tp] >= end[tp] for tp in tps):
                return records
    finally:
        await consumer.stop()


def cli_env(p: Pipeline) -> dict[str, str]:
    """Environment for an ``inferline`` CLI process against the session's pipeline."""
    return {**os.environ, **p.settings.to_env(), "PYTHONPATH": str(ROOT)}


T0_MS = 1_800_000_000_000


async def produce_batches(broker: str, topic: str) -> None:
    """Three record batches of 1, 10 and 100 records to partition 0, record i of each
    stamped T0, T0+1000 and T0+2000 ms plus i; the embedded broker lists the end at 12."""
    producer = AIOKafkaProducer(bootstrap_servers=broker, linger_ms=50)
    await producer.start()
    try:
        for size, base_ms in ((1, T0_MS), (10, T0_MS + 1_000), (100, T0_MS + 2_000)):
            batch = producer.create_batch()
            for i in range(size):
                assert batch.append(key=None, value=str(i).encode(),
                                    timestamp=base_ms + i) is not None
            batch.close()
            await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()
