"""Delivery guarantees when processes die: real broker, real processes, killed by the test.

Each test runs a pipeline of its own (topic prefix, consumer groups, state dir) next to
the session's shared one, puts requests in flight, then kills or stops a router or a
worker mid-stream and checks, on the reply topic itself, that every request was
answered. Duplicates are allowed after a crash (at-least-once) and reported; after a
graceful stop there must be none.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.processes import ServeProcess
from agents.serve import prepare_topics
from pipeline.client import InferenceClient
from pipeline.errors import ClientTimeout
from pipeline.modelstore import load_heldout
from pipeline.settings import Settings
from pipeline.topics import PRIORITIES, crc32_partitioner
from schemas.messages import InferenceResponse
from tests.integration.conftest import read_topic

# Generous upper limits, only so that a broken guarantee fails instead of hanging.
READY_TIMEOUT_S = 120.0
ANSWER_TIMEOUT_S = 120.0
COMMIT_TIMEOUT_S = 60.0

pytestmark = pytest.mark.timeout(400)


def _request(x: np.ndarray[Any, Any], rid: str) -> dict[str, Any]:
    rows = x.reshape(-1, 64)
    return {
        "id": rid,
        "model": "digits",
        "priority": "normal",
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32",
             "data": rows.ravel().tolist()}
        ],
    }


class CrashPipeline:
    """A router/worker pipeline of one test: its own topics, groups, state and logs."""

    def __init__(self, base: Settings, broker: str, state_dir: Path) -> None:
        self.settings = base.model_copy(update={
            "topic_prefix": f"crash-{uuid.uuid4().hex[:10]}",
            "state_dir": state_dir,
            # The embedded broker needs short group timeouts for quick takeovers.
            "session_timeout_ms": 3_000,
            "rebalance_timeout_ms": 3_000,
            "heartbeat_interval_ms": 300,
            "metrics_port": 0,
        })
        self.broker = broker
        self.procs: list[ServeProcess] = []
        self.intended: set[int] = set()  # ids of processes the test signalled on purpose
        self.x, _ = load_heldout(self.settings.model_dir)
        self.parts = list(range(self.settings.partitions))

    def spawn(self, role: str, name: str) -> ServeProcess:
        """A serve process (not started), logging to ``state_dir/logs/<name>.log``."""
        p = ServeProcess(
            self.settings, self.broker, role, worker_id=name,
            log_path=self.settings.state_dir / "logs" / f"{name}.log",
        )
        self.procs.append(p)
        return p

    async def start(self, *procs: ServeProcess) -> None:
        for p in procs:
            await p.start()

    async def kill(self, p: ServeProcess, sig: int) -> None:
        """Send ``sig`` to a process the test means to end."""
        self.intended.add(id(p))
        p.kill(sig)

    def check_alive(self) -> None:
        """Fail now if a process the test did not signal has exited (crash, crash loop)."""
        for p in self.procs:
            if id(p) not in self.intended and p.returncode is not None:
                pytest.fail(
                    f"{p.settings.worker_id} ({p.role}) exited unexpectedly with "
                    f"{p.returncode}:\n{self.logs()}", pytrace=False,
                )

    def logs(self, lines: int = 25) -> str:
        return "\n".join(
            f"--- {p.settings.worker_id} ({p.role}, rc={p.returncode}) {p.log_path}\n"
            f"{p.tail(lines)}"
            for p in self.procs
        )

    async def stop_all(self) -> dict[str, int | None]:
        codes = await asyncio.gather(*(p.stop() for p in self.procs))
        return {p.settings.worker_id: c for p, c in zip(self.procs, codes, strict=True)}

    def lane_partition(self, rid: str) -> int:
        """The lane partition of a request: the router keys lane records by request id."""
        return crc32_partitioner(rid.encode(), self.parts, self.parts)

    def requests(self, tag: str, n: int) -> list[tuple[str, dict[str, Any]]]:
        run = uuid.uuid4().hex[:6]
        return [
            (f"{tag}-{run}-{i}", _request(self.x[i % len(self.x)], f"{tag}-{run}-{i}"))
            for i in range(n)
        ]

    async def wait_ready(self, client: InferenceClient, workers: Iterable[str]) -> None:
        """Until every worker in ``workers`` has answered (all of them hold lane partitions)."""
        want, seen = set(workers), set[str]()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not want <= seen:
            self.check_alive()
            if time.monotonic() > deadline:
                pytest.fail(f"pipeline not ready, answers from {seen} only:\n{self.logs()}",
                            pytrace=False)
            try:
                batch = [req for _, req in self.requests("ready", 8)]
                for resp in await client.infer_many(batch, wait_timeout_ms=3_000):
                    assert resp.status == "ok", resp
                    seen.add(resp.worker or "")
            except ClientTimeout:
                continue  # groups still forming

    async def feed(
        self, client: InferenceClient, reqs: list[tuple[str, dict[str, Any]]],
        futures: dict[str, asyncio.Future[InferenceResponse]], *, chunk: int, pause_s: float,
    ) -> None:
        """Submit ``reqs`` ``chunk`` at a time, ``pause_s`` apart, never awaiting an answer."""
        for i in range(0, len(reqs), chunk):
            for rid, req in reqs[i:i + chunk]:
                futures[rid] = await client.submit(req)
            await asyncio.sleep(pause_s)

    async def wait_answered(
        self, futures: dict[str, asyncio.Future[InferenceResponse]], n: int,
        poll_s: float = 0.05,
    ) -> None:
        """Until ``n`` of the futures are done, or ANSWER_TIMEOUT_S has passed."""
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while sum(f.done() for f in futures.values()) < n and time.monotonic() < deadline:
            self.check_alive()
            await asyncio.sleep(poll_s)

    async def sigkill_mid_stream(
        self, client: InferenceClient, reqs: list[tuple[str, dict[str, Any]]],
        futures: dict[str, asyncio.Future[InferenceResponse]], victim: ServeProcess,
        meanwhile: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """SIGKILL ``victim`` a fifth of the way into a steady stream of ``reqs``.

        The stream (about 2,000 requests/s) goes on after the kill, so requests keep
        arriving where the victim served; ``meanwhile`` runs between the kill and the
        stream's end. Returns how many answers the client had at the kill.
        """
        feeder = asyncio.create_task(self.feed(client, reqs, futures, chunk=100, pause_s=0.05))
        try:
            await self.wait_answered(futures, len(reqs) // 5, poll_s=0.005)
            await self.kill(victim, signal.SIGKILL)
            answered_at_kill = sum(f.done() for f in futures.values())
            assert victim.proc is not None
            assert await asyncio.wait_for(victim.proc.wait(), 30) == -signal.SIGKILL
            if meanwhile is not None:
                await meanwhile()
            await feeder
        finally:
            feeder.cancel()
        assert answered_at_kill < len(reqs), "the stream ended before the kill; nothing to prove"
        return answered_at_kill

    async def wait_committed(self, group: str, topics: Iterable[str]) -> dict[Any, Any]:
        """Until ``group``'s committed offsets reach the end of ``topics``; returns the lag."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.broker, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(t, p) for t in topics for p in self.parts]
            end = await consumer.end_offsets(tps)
            deadline = time.monotonic() + COMMIT_TIMEOUT_S
            while True:
                committed = {tp: (await consumer.committed(tp)) or 0 for tp in tps}
                lag = {f"{tp.topic}[{tp.partition}]": (committed[tp], end[tp])
                       for tp in tps if committed[tp] < end[tp]}
                if not lag or time.monotonic() > deadline:
                    return lag
                self.check_alive()
                await asyncio.sleep(0.2)
        finally:
            await consumer.stop()

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.broker, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            return {p: (await consumer.committed(TopicPartition(topic, p))) or 0
                    for p in self.parts}
        finally:
            await consumer.stop()

    @property
    def lanes(self) -> list[str]:
        return [self.settings.lane_topic("digits", p) for p in PRIORITIES]


@asynccontextmanager
async def crash_pipeline(
    pipeline_settings: Settings, broker: str, tmp_path: Path
) -> AsyncIterator[CrashPipeline]:
    cp = CrashPipeline(pipeline_settings, broker, tmp_path / "state")
    await prepare_topics(cp.settings, broker, ["digits"])
    try:
        yield cp
    finally:
        codes = await cp.stop_all()
        print(f"[crash] exit codes {codes}")


class Answers:
    """What the reply topic holds for the load's ids, read raw after the pipeline settled."""

    def __init__(self, records: list[Any], ids: Iterable[str]) -> None:
        wanted = set(ids)
        self.by_id: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for rec in records:
            body = orjson.loads(rec.value)
            if body.get("id") in wanted:
                self.by_id[body["id"]].append(body)
        self.missing = sorted(wanted - self.by_id.keys())
        self.not_ok = {i: [b.get("status") for b in bodies] for i, bodies in self.by_id.items()
                       if any(b.get("status") != "ok" for b in bodies)}
        self.workers = {i: [b.get("worker") for b in bodies] for i, bodies in self.by_id.items()}
        self.dups = {i: w for i, w in self.workers.items() if len(w) > 1}

    @property
    def duplicates(self) -> int:
        return sum(len(b) - 1 for b in self.by_id.values())


async def _settle_and_read(
    cp: CrashPipeline, client: InferenceClient, ids: list[str], groups: dict[str, list[str]]
) -> Answers:
    """Wait for the groups to commit everything (no redelivery can follow), read the replies."""
    for group, topics in groups.items():
        lag = await cp.wait_committed(group, topics)
        assert not lag, f"group {group} never committed the end of its topics: {lag}\n{cp.logs()}"
    return Answers(await read_topic(cp.broker, client.reply_topic), ids)


def _check_all_answered(
    cp: CrashPipeline, scenario: str, futures: dict[str, asyncio.Future[InferenceResponse]],
) -> None:
    pending = [rid for rid, f in futures.items() if not f.done()]
    failed = {rid: repr(f.exception()) for rid, f in futures.items()
              if f.done() and not f.cancelled() and f.exception() is not None}
    lost_parts = collections.Counter(cp.lane_partition(rid) for rid in pending)
    assert not pending and not failed, (
        f"{scenario}: {len(pending)} of {len(futures)} requests got no response within "
        f"{ANSWER_TIMEOUT_S:.0f}s (lane partitions {dict(lost_parts)}; first ids {pending[:10]}), "
        f"{len(failed)} failed ({list(failed.items())[:5]})\n{cp.logs()}"
    )
    bad = {rid: f.result().status for rid, f in futures.items() if f.result().status != "ok"}
    assert not bad, f"{scenario}: non-ok responses {list(bad.items())[:10]}"


def _report(
    cp: CrashPipeline, scenario: str, client: InferenceClient, answers: Answers
) -> str:
    line = (
        f"[crash] {scenario}: {len(answers.by_id)} ids answered, duplicates on the reply topic "
        f"{answers.duplicates} ({len(answers.dups)} ids), client counters {client.stats()}"
    )
    if answers.dups:
        where = collections.Counter(
            (cp.lane_partition(rid), "+".join(w)) for rid, w in answers.dups.items())
        line += (f"; duplicated ids by (lane partition, workers): {dict(where)}; "
                 f"e.g. {sorted(answers.dups)[:5]}")
    print(line)
    return line


async def test_worker_sigkill_mid_stream_loses_nothing(
    pipeline_settings: Settings, broker: str, tmp_path: Path
) -> None:
    """Two workers share the lanes; one is SIGKILLed; the survivor takes its partitions over."""
    n = 5_000
    async with crash_pipeline(pipeline_settings, broker, tmp_path) as cp:
        router = cp.spawn("router", "crash-router")
        victim, survivor = cp.spawn("worker", "crash-w1"), cp.spawn("worker", "crash-w2")
        await cp.start(router, victim, survivor)
        async with InferenceClient(cp.settings, bootstrap_servers=broker) as client:
            await cp.wait_ready(client, ["crash-w1", "crash-w2"])
            reqs = cp.requests("wkill", n)
            futures: dict[str, asyncio.Future[InferenceResponse]] = {}
            # Streamed, so requests keep arriving on the victim's partitions after the
            # kill: with all of them sent at once, a fast victim could answer and commit
            # all it took before its answers reached the client, leaving the survivor
            # nothing to take over.
            answered_at_kill = await cp.sigkill_mid_stream(client, reqs, futures, victim)
            await cp.wait_answered(futures, n)
            _check_all_answered(cp, "worker SIGKILL", futures)
            answers = await _settle_and_read(
                cp, client, [rid for rid, _ in reqs], {cp.settings.group_id("worker"): cp.lanes}
            )
            report = _report(cp, f"worker SIGKILL after {answered_at_kill}/{n} answered",
                             client, answers)
            assert not answers.missing and not answers.not_ok, (answers.missing[:10],
                                                                answers.not_ok, report)
            # The survivor took the victim's lane partitions over: there, requests the
            # victim never answered were answered by the survivor.
            victim_parts = {cp.lane_partition(rid) for rid, w in answers.workers.items()
                            if "crash-w1" in w}
            assert victim_parts, f"the victim answered nothing; {report}"
            # Either requests the victim never answered, or (when it had answered all it
            # took) its uncommitted tail, replayed: both mean the survivor read on from
            # the victim's last commit.
            taken_over = [rid for rid, w in answers.workers.items()
                          if cp.lane_partition(rid) in victim_parts and "crash-w2" in w]
            only_survivor = sum(1 for rid in taken_over
                                if set(answers.workers[rid]) == {"crash-w2"})
            print(f"[crash] victim's lane partitions {sorted(victim_parts)}: "
                  f"{len(taken_over)} requests there answered by the survivor "
                  f"({only_survivor} only by it)")
            assert taken_over, f"the survivor answered nothing of {victim_parts}; {report}"


async def test_router_sigkill_and_restart_loses_nothing(
    pipeline_settings: Settings, broker: str, tmp_path: Path
) -> None:
    """The router is SIGKILLed mid-stream; a new router process takes over from its commit."""
    n = 2_000
    async with crash_pipeline(pipeline_settings, broker, tmp_path) as cp:
        router, worker = cp.spawn("router", "crash-router"), cp.spawn("worker", "crash-worker")
        await cp.start(router, worker)
        requests_topic = cp.settings.topic("requests")
        router_group = cp.settings.group_id("router")
        async with InferenceClient(cp.settings, bootstrap_servers=broker) as client:
            await cp.wait_ready(client, ["crash-worker"])
            reqs = cp.requests("rkill", n)
            futures: dict[str, asyncio.Future[InferenceResponse]] = {}
            committed_at_kill: dict[int, int] = {}

            async def restart() -> None:
                committed_at_kill.update(await cp.committed(router_group, requests_topic))
                await cp.start(cp.spawn("router", "crash-router-2"))

            # Streamed, so requests keep arriving while there is no router.
            answered_at_kill = await cp.sigkill_mid_stream(client, reqs, futures, router,
                                                           meanwhile=restart)
            await cp.wait_answered(futures, n)
            _check_all_answered(cp, "router SIGKILL + restart", futures)
            answers = await _settle_and_read(cp, client, [rid for rid, _ in reqs], {
                router_group: [requests_topic], cp.settings.group_id("worker"): cp.lanes,
            })
            report = _report(cp, f"router SIGKILL after {answered_at_kill}/{n} answered, restart",
                             client, answers)
            assert not answers.missing and not answers.not_ok, (answers.missing[:10],
                                                                answers.not_ok, report)
            # The new router resumed from the dead one's last commit and routed the rest.
            end = await cp.committed(router_group, requests_topic)
            assert sum(end.values()) > sum(committed_at_kill.values()), (
                committed_at_kill, end, report)


async def test_worker_sigterm_drains_without_duplicates(
    pipeline_settings: Settings, broker: str, tmp_path: Path
) -> None:
    """SIGTERM one of two workers mid-stream: it drains and commits; nothing is answered twice."""
    n = 5_000
    async with crash_pipeline(pipeline_settings, broker, tmp_path) as cp:
        router = cp.spawn("router", "crash-router")
        leaving, staying = cp.spawn("worker", "crash-w1"), cp.spawn("worker", "crash-w2")
        await cp.start(router, leaving, staying)
        async with InferenceClient(cp.settings, bootstrap_servers=broker) as client:
            await cp.wait_ready(client, ["crash-w1", "crash-w2"])
            reqs = cp.requests("wterm", n)
            futures: dict[str, asyncio.Future[InferenceResponse]] = {}
            await cp.feed(client, reqs, futures, chunk=n, pause_s=0)  # all in flight at once
            await cp.wait_answered(futures, n // 10, poll_s=0.005)
            await cp.kill(leaving, signal.SIGTERM)
            answered_at_stop = sum(f.done() for f in futures.values())
            assert leaving.proc is not None
            code = await asyncio.wait_for(leaving.proc.wait(), 60)
            assert code == 0, f"SIGTERM must stop a worker cleanly, got {code}:\n{cp.logs()}"
            assert answered_at_stop < n, "the stream ended before the stop; nothing to prove"
            await cp.wait_answered(futures, n)
            _check_all_answered(cp, "worker SIGTERM", futures)
            answers = await _settle_and_read(cp, client, [rid for rid, _ in reqs], {
                cp.settings.group_id("router"): [cp.settings.topic("requests")],
                cp.settings.group_id("worker"): cp.lanes,
            })
            report = _report(cp, f"worker SIGTERM after {answered_at_stop}/{n} answered",
                             client, answers)
            assert not answers.missing and not answers.not_ok, (answers.missing[:10],
                                                                answers.not_ok, report)
            # The leaving worker's lane partitions went to the one staying, which answered
            # requests there that the leaving one never saw.
            leaving_parts = {cp.lane_partition(rid) for rid, w in answers.workers.items()
                             if "crash-w1" in w}
            taken_over = [rid for rid, w in answers.workers.items()
                          if cp.lane_partition(rid) in leaving_parts and w == ["crash-w2"]]
            print(f"[crash] leaving worker's lane partitions {sorted(leaving_parts)}: "
                  f"{len(taken_over)} requests there answered by the one staying")
            # The leaving worker commits its drained batch before it leaves, and the one
            # staying must not re-handle a batch it had in hand when the group rebalanced:
            # ids answered twice by crash-w2 on its own partition point at the latter.
            assert answers.duplicates == 0, (
                f"a graceful stop must not answer anything twice: {report}\n{cp.logs()}"
            )
            # Whether anything was left on its partitions to take over depends on how
            # much the leaving worker had drained, so it is reported, not asserted.
