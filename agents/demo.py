"""``inferline demo``: the whole pipeline, on a laptop, in one process tree.

Builds the models if missing, starts an embedded broker (unless bootstrap
servers are configured), a router and a worker process, produces a mixed
workload (steady traffic over three priorities, malformed records, a burst),
consumes every response and prints a summary per model and priority, with the
accuracy measured from the responses themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agents.processes import ServeProcess
from agents.serve import prepare_topics
from pipeline.broker import EmbeddedBroker
from pipeline.client import InferenceClient
from pipeline.modelstore import ensure_models, load_heldout
from pipeline.registry import Registry
from pipeline.report import summarise
from pipeline.settings import Settings
from schemas import InferenceResponse

PRIORITY_MIX = (("high", 0.2), ("normal", 0.6), ("batch", 0.2))
# minilm's share of the workload: pairs of texts that say the same thing in other
# words. The summary compares the embeddings the pipeline returns for the two halves
# of each pair with those of texts from different pairs.
PARAPHRASE_PAIRS = (
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The stock market fell sharply on Monday.",
     "Shares dropped steeply at the start of the week."),
    ("How do I reset my password?", "What are the steps to change my login password?"),
    ("The cat sleeps on the warm windowsill.", "A kitten is napping in the sun by the window."),
    ("The train to Berlin leaves at nine tomorrow morning.",
     "Tomorrow's Berlin train departs at 9 a.m."),
    ("Please summarise the quarterly report in three bullet points.",
     "Give me a three-point summary of the report for this quarter."),
    ("It is raining heavily in the city today.", "There is a downpour over town today."),
    ("The restaurant was closed for renovation.",
     "The diner shut its doors while being remodeled."),
    ("Kafka topics carry requests from producers to the workers that batch them.",
     "Workers receive batched requests that producers publish on Kafka topics."),
    ("She won the chess tournament without losing a game.",
     "Undefeated, she took first place in the chess championship."),
)
DEMO_TEXTS = tuple(t for pair in PARAPHRASE_PAIRS for t in pair)


@dataclass
class DemoOptions:
    """Size of the demo workload."""

    requests: int = 3000
    burst: int = 1000
    malformed: int = 30
    rate: float = 1500.0
    texts: int = 300
    ready_timeout_s: float = 120.0


def digits_request(row: np.ndarray[Any, Any], rid: str, priority: str) -> dict[str, Any]:
    """One digits request for a single 8x8 image."""
    return {
        "id": rid,
        "model": "digits",
        "priority": priority,
        "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}
        ],
    }


def text_request(text: str, rid: str, priority: str) -> dict[str, Any]:
    """One minilm request embedding a single text."""
    return {
        "id": rid,
        "model": "minilm",
        "priority": priority,
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}],
    }


def paraphrase_gap(embeddings: dict[int, np.ndarray[Any, Any]]) -> tuple[float, float, int]:
    """Mean cosine of paraphrase pairs and of texts from different pairs, and pairs seen.

    ``embeddings`` maps an index of :data:`DEMO_TEXTS` to its returned embedding.
    """
    same: list[float] = []
    other: list[float] = []
    for a in embeddings:
        for b in embeddings:
            if a < b:
                cos = float(np.dot(embeddings[a], embeddings[b]) / (
                    np.linalg.norm(embeddings[a]) * np.linalg.norm(embeddings[b])))
                (same if a // 2 == b // 2 else other).append(cos)
    nan = float("nan")
    return (float(np.mean(same)) if same else nan, float(np.mean(other)) if other else nan,
            len(same))


def malformed_records(n: int, reply_to: str) -> list[tuple[str | None, bytes, str]]:
    """``(id or None, value, expected code)`` for each kind of bad record, cycling."""
    kinds = [
        (False, b'{"id": "x", "model": "digits", "inputs": [', "INVALID_REQUEST"),
        (False, orjson.dumps({"model": "digits", "inputs": []}), "INVALID_REQUEST"),
        (True, {"model": "digits", "inputs": [
            {"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]},
         "INVALID_INPUT"),
        (True, {"model": "digits", "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}]},
         "INVALID_INPUT"),
        (True, {"model": "no-such-model", "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]},
         "UNKNOWN_MODEL"),
    ]
    out: list[tuple[str | None, bytes, str]] = []
    for i in range(n):
        has_id, body, code = kinds[i % len(kinds)]
        if has_id:
            rid = f"bad-{i}-{uuid.uuid4().hex[:8]}"
            assert isinstance(body, dict)
            out.append((rid, orjson.dumps({**body, "id": rid, "reply_to": reply_to}), code))
        else:
            assert isinstance(body, bytes)
            out.append((None, body, code))
    return out


@contextlib.asynccontextmanager
async def _broker(settings: Settings) -> AsyncIterator[str]:
    if settings.bootstrap_servers:
        yield settings.bootstrap_servers
        return
    async with EmbeddedBroker(threads=settings.embedded_broker_threads) as broker:
        yield broker.bootstrap_servers


async def _count_dlq(settings: Settings, bootstrap: str, stop: asyncio.Event) -> dict[str, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, **settings.kafka_security()
    )
    await consumer.start()
    codes: dict[str, int] = {}
    try:
        parts = consumer.partitions_for_topic(settings.topic("dlq")) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(settings.topic("dlq")) or set()
        tps = [TopicPartition(settings.topic("dlq"), p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        end: dict[TopicPartition, int] | None = None
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    code = dict(r.headers).get("inferline-error-code", b"?").decode()
                    codes[code] = codes.get(code, 0) + 1
            if stop.is_set():
                # Every answer is in, so every DLQ record is written: read up to the end.
                end = end or await consumer.end_offsets(tps)
                if all([await consumer.position(tp) >= end[tp] for tp in tps]):
                    return codes
    finally:
        await consumer.stop()


async def run_demo(settings: Settings, opts: DemoOptions) -> int:
    """Run the demo; returns the process exit status.

    0 when every request is answered ok, the digits accuracy is at least 0.9 and the
    minilm embeddings of paraphrases are closer than those of unrelated texts.
    """
    # Wide enough for the summary table even when stdout is not a terminal.
    console = Console(width=max(Console().width, 120))
    reports = await asyncio.to_thread(ensure_models, settings.model_dir)
    for r in reports:
        console.print(
            f"built [bold]{r.model}:{r.version}[/] in {r.seconds:.1f}s: {r.summary}"
        )
    registry = Registry.load(settings.registry_path)
    x, y = load_heldout(settings.model_dir)
    if not settings.bootstrap_servers:
        # The embedded broker holds a new group's first join for half the session
        # timeout; a laptop demo has no reason to wait that long.
        settings = settings.model_copy(update={
            "session_timeout_ms": min(settings.session_timeout_ms, 4000),
            "rebalance_timeout_ms": min(settings.rebalance_timeout_ms, 4000),
            "heartbeat_interval_ms": min(settings.heartbeat_interval_ms, 400),
        })
    async with _broker(settings) as bootstrap:
        await prepare_topics(settings, bootstrap, registry.names())
        procs = [ServeProcess(settings, bootstrap, role) for role in ("router", "worker")]
        for p in procs:
            await p.start()
        try:
            return await _drive(settings, bootstrap, opts, x, y, console)
        finally:
            for p in procs:
                await p.stop()


async def _drive(
    settings: Settings, bootstrap: str, opts: DemoOptions,
    x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], console: Console,
) -> int:
    rng = random.Random(7)
    stop_dlq = asyncio.Event()
    dlq_task = asyncio.create_task(_count_dlq(settings, bootstrap, stop_dlq))
    async with InferenceClient(settings, bootstrap_servers=bootstrap) as client:
        with console.status("waiting for the router and worker to join their groups..."):
            started = time.perf_counter()
            await client.wait_until_served(
                "digits", {"input": x[:1]}, timeout_ms=opts.ready_timeout_s * 1000
            )
            if opts.texts:
                await client.wait_until_served(
                    "minilm", {"text": np.array([DEMO_TEXTS[0].encode()], dtype=object)},
                    timeout_ms=opts.ready_timeout_s * 1000,
                )
            waited = time.perf_counter() - started
        console.print(f"pipeline ready after {waited:.1f}s")
        bad = malformed_records(opts.malformed, client.reply_topic)
        total = opts.requests + opts.burst
        # Text requests ride along the steady phase, one every `text_every` digits requests.
        n_texts = opts.texts if opts.requests else 0
        text_every = max(1, opts.requests // n_texts) if n_texts else 0
        records: list[tuple[InferenceResponse, str, float, float]] = []
        truth: dict[str, int] = {}
        text_of: dict[str, int] = {}
        tasks: list[asyncio.Task[None]] = []
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console,
        )

        async def track(fut: asyncio.Future[InferenceResponse], prio: str, sent: float) -> None:
            try:
                resp = await asyncio.wait_for(fut, 60)
            except TimeoutError:
                return
            records.append((resp, prio, sent, time.time() * 1000))
            progress.advance(bar)

        with progress:
            bar = progress.add_task(
                "responses", total=total + n_texts + sum(1 for b in bad if b[0])
            )
            # Malformed records go out at random points of the steady phase and burst.
            slots = rng.sample(range(max(total, len(bad))), len(bad))
            bad_at = dict(zip(slots, bad, strict=True))
            started = time.perf_counter()
            for i in range(total):
                if i < opts.requests:
                    delay = started + i / opts.rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    prio = rng.choices(
                        [p for p, _ in PRIORITY_MIX], [w for _, w in PRIORITY_MIX]
                    )[0]
                else:
                    prio = "normal"
                j = rng.randrange(len(x))
                rid = f"demo-{i}-{uuid.uuid4().hex[:8]}"
                truth[rid] = int(y[j])
                sent = time.time() * 1000
                fut = await client.submit(digits_request(x[j], rid, prio))
                tasks.append(asyncio.create_task(track(fut, prio, sent)))
                if text_every and i % text_every == 0 and len(text_of) < n_texts:
                    k = len(text_of) % len(DEMO_TEXTS)
                    tid = f"demo-text-{len(text_of)}-{uuid.uuid4().hex[:8]}"
                    text_of[tid] = k
                    sent = time.time() * 1000
                    fut = await client.submit(text_request(DEMO_TEXTS[k], tid, prio))
                    tasks.append(asyncio.create_task(track(fut, prio, sent)))
                bad_here = bad_at.get(i)
                if bad_here is not None:
                    bid, value, _code = bad_here
                    if bid is not None:
                        tasks.append(asyncio.create_task(
                            track(client.expect(bid), "normal", time.time() * 1000)))
                    await client.send_raw(value, key=bid.encode() if bid else None)
            await asyncio.gather(*tasks)
        stop_dlq.set()
        dlq = await dlq_task
    _print_summary(
        console, records, truth, dlq, total + n_texts + sum(1 for b in bad if b[0])
    )
    digits_ok = [r for r, *_ in records if r.status == "ok" and r.id in truth]
    correct = sum(
        1 for r in digits_ok
        if int(next(o.data for o in r.outputs if o.name == "label")[0]) == truth[r.id]
    )
    accuracy = correct / len(digits_ok) if digits_ok else 0.0
    console.print(
        f"digits accuracy measured from {len(digits_ok)} ok responses: [bold]{accuracy:.4f}[/]"
    )
    embeddings: dict[int, np.ndarray[Any, Any]] = {}
    texts_ok = 0
    for r, *_ in records:
        if r.status == "ok" and r.id in text_of:
            texts_ok += 1
            out = next(o for o in r.outputs if o.name == "embedding")
            embeddings.setdefault(text_of[r.id], np.asarray(out.data, dtype=np.float64))
    same, other, pairs = paraphrase_gap(embeddings)
    if n_texts:
        console.print(
            f"minilm from {texts_ok} ok responses: paraphrase pairs mean cosine "
            f"[bold]{same:.3f}[/] vs unrelated texts {other:.3f} ({pairs} pairs)"
        )
    texts_fine = not n_texts or (texts_ok >= n_texts and same > other + 0.2)
    return 0 if accuracy >= 0.9 and len(digits_ok) >= total and texts_fine else 1


def _print_summary(
    console: Console, records: list[tuple[InferenceResponse, str, float, float]],
    truth: dict[str, int], dlq: dict[str, int], expected: int,
) -> None:
    table = Table(title="inferline demo: responses by model and priority")
    for col in ("model", "priority", "count", "status", "req/s", "p50 ms", "p99 ms",
                "mean batch", "$ per 1,000"):
        table.add_column(col, justify="right" if col not in ("model", "priority", "status")
                         else "left")
    for row in summarise(records):
        table.add_row(
            row.model, row.priority, str(row.count),
            ", ".join(f"{k} {v}" for k, v in sorted(row.statuses.items())),
            f"{row.throughput_per_s:,.0f}", f"{row.percentile_ms(50):.1f}",
            f"{row.percentile_ms(99):.1f}", f"{row.mean_batch_size:.1f}",
            f"{row.cost_per_1000_usd:.2e}",
        )
    console.print(table)
    codes = _codes_text(r.error.code for r, *_ in records if r.error)
    console.print(
        f"responses received: {len(records)} of {expected}; error codes: {codes or 'none'}; "
        f"DLQ records: {sum(dlq.values())} {dlq or ''}"
    )


def _codes_text(codes: Iterable[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(Counter(codes).items()))
