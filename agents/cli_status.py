"""``inferline status``: per model, is the infrastructure or the model itself at fault?

Reads, from the configured cluster, the worker telemetry of the last ``--history-s``
(heartbeats, request summaries, output summaries), the control topic (worker
readiness, deployments), the router's rejections in the DLQ over the window, and
two samples of the lanes' backlog per worker group; feeds them to
:class:`pipeline.health.HealthMonitor` and prints one line per model version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from pipeline.control import ControlView
from pipeline.drift import Reference, load_references, save_references
from pipeline.errors import BrokerError, RegistryError
from pipeline.health import HealthMonitor, HealthThresholds, ModelHealth
from pipeline.registry import Registry
from pipeline.responses import DLQ_CODE, DLQ_SOURCE
from pipeline.settings import Settings
from pipeline.telemetry import Heartbeat, RequestSummary, decode_record
from pipeline.topics import PRIORITIES, exact_end_offsets

DEFAULT_HISTORY_S = 3600.0
# Lane backlog is sampled at least this far apart, to tell growing from steady.
LANE_SAMPLE_GAP_S = 1.0
_IDLE_POLL_MS = 200
_CONTROL_CATCH_UP_S = 5.0
_READ_TIMEOUT_S = 60.0


@dataclass
class StatusReport:
    """What ``inferline status`` found."""

    healths: dict[tuple[str, str], ModelHealth]
    at_ms: float
    telemetry_records: int = 0
    rejections: int = 0
    errors: list[str] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``inferline status`` to the command line."""
    p = sub.add_parser("status", help="health of each model: infrastructure or model degradation")
    p.add_argument("--window-s", type=float, default=None,
                   help="recent window judged (default INFERLINE_HEALTH_WINDOW_S)")
    p.add_argument("--history-s", type=float, default=DEFAULT_HISTORY_S,
                   help="how far back telemetry is read: heartbeats and each version's first "
                   f"rows, its drift reference (default {DEFAULT_HISTORY_S:.0f})")
    p.add_argument("--reference", type=Path, default=None,
                   help="drift references file (default INFERLINE_DRIFT_REFERENCE_FILE)")
    p.add_argument("--save-reference", type=Path, default=None,
                   help="write the references in force to this file, for later --reference")
    p.add_argument("--json", action="store_true", help="one JSON object per model version")
    p.set_defaults(func=cmd_status)


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """Print the health table; exit 0 when every model is healthy, 1 when not, 2 on errors."""
    if not settings.bootstrap_servers:
        print("inferline status: INFERLINE_BOOTSTRAP_SERVERS is not set (status reads a "
              "running pipeline's topics)", file=sys.stderr)
        return 2
    ref_path = args.reference or settings.drift_reference_file
    references = load_references(ref_path) if ref_path else {}
    report = asyncio.run(collect_status(
        settings, settings.bootstrap_servers, window_s=args.window_s,
        history_s=args.history_s, references=references,
    ))
    if args.save_reference:
        save_references(args.save_reference, report.references)
        print(f"saved {len(report.references)} references to {args.save_reference}",
              file=sys.stderr)
    if args.json:
        for (model, version), h in report.healths.items():
            print(json.dumps({"model": model, "version": version, "state": h.state,
                              "infra": h.infra, "model_degradation": h.model,
                              "reasons": h.reasons, "workers": list(h.live_workers),
                              "drift_score": h.drift.score if h.drift else None,
                              "reference": h.reference}))
    else:
        print(format_table(report))
    if report.errors:
        return 2
    return 0 if all(h.state == "healthy" for h in report.healths.values()) else 1


def format_table(report: StatusReport) -> str:
    """The report as a text table: model, version, state, reason."""
    rows = [("MODEL", "VERSION", "STATE", "REASON")]
    for (model, version), h in report.healths.items():
        reasons = h.reasons or [f"ok ({len(h.live_workers)} workers; drift reference: "
                                f"{h.reference}{_drift_note(h)})"]
        rows.append((model, version, h.state, reasons[0]))
        rows.extend(("", "", "", r) for r in reasons[1:])
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
             for r in rows]
    if len(rows) == 1:
        lines.append("(no model versions seen: no telemetry, deployments or registry)")
    lines.extend(f"error: {e}" for e in report.errors)
    return "\n".join(line.rstrip() for line in lines)


def _drift_note(h: ModelHealth) -> str:
    return f", score {h.drift.score:.3f}" if h.drift else ""


async def collect_status(
    settings: Settings,
    bootstrap: str,
    *,
    window_s: float | None = None,
    history_s: float = DEFAULT_HISTORY_S,
    references: dict[tuple[str, str], Reference] | None = None,
) -> StatusReport:
    """Read the pipeline's topics and judge every model version now."""
    registry = _registry(settings)
    preferred = {(v.name, v.version): v.execution_provider for v in registry} if registry else {}
    monitor = HealthMonitor(
        HealthThresholds.from_settings(settings, window_s=window_s),
        references=references, preferred_providers=preferred,
    )
    window_ms = monitor.t.window_ms
    started = time.time()
    errors: list[str] = []
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False,
        fetch_max_wait_ms=settings.fetch_max_wait_ms, **settings.kafka_security(),
    )
    try:
        await reader.start()
    except (KafkaError, OSError) as exc:
        await reader.stop()
        detail = f"cannot reach the broker at {bootstrap}: {exc!r}"
        monitor.observe_broker_error(detail, started * 1000)
        for name, entry in (registry.entries if registry else {}).items():
            monitor.expect(name, entry.default_version)
        return StatusReport(monitor.assess(started * 1000), started * 1000, errors=[detail])
    n_telemetry = n_rejected = 0
    try:
        telemetry = await _read_since(reader, settings.topic("telemetry"),
                                      started * 1000 - history_s * 1000)
        records = _decode_telemetry(telemetry)
        n_telemetry = len(records)
        for rec in sorted(records, key=lambda r: r.end_ms):
            monitor.observe(rec)
        await _control(settings, bootstrap, monitor, registry, errors)
        n_rejected = await _rejections(reader, settings, monitor, started * 1000 - window_ms)
        pools = monitor.pools()
        await _sample_lanes(settings, bootstrap, reader, monitor, pools)
        gap = LANE_SAMPLE_GAP_S - (time.time() - started)
        if gap > 0:
            await asyncio.sleep(gap)
        await _sample_lanes(settings, bootstrap, reader, monitor, pools)
    except (KafkaError, BrokerError) as exc:
        detail = f"reading from {bootstrap} failed: {exc!r}"
        errors.append(detail)
        monitor.observe_broker_error(detail, time.time() * 1000)
    finally:
        await reader.stop()
    now_ms = time.time() * 1000
    healths = monitor.assess(now_ms)
    return StatusReport(healths, now_ms, n_telemetry, n_rejected, errors, monitor.references())


def _registry(settings: Settings) -> Registry | None:
    """The registry when this machine has it: default versions and provider preferences."""
    try:
        return Registry.load(settings.registry_path)
    except RegistryError:
        return None


def _decode_telemetry(records: Iterable[Any]) -> list[RequestSummary | Heartbeat]:
    out: list[RequestSummary | Heartbeat] = []
    for r in records:
        with contextlib.suppress(ValidationError):
            out.append(decode_record(r.value))
    return out


async def _partitions(reader: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    reader._client.add_topic(topic)
    await reader._client.force_metadata_update()
    return [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]


async def _read_since(reader: AIOKafkaConsumer, topic: str, since_ms: float) -> list[Any]:
    """Records of ``topic`` from ``since_ms`` up to its end offsets as they are now."""
    tps = await _partitions(reader, topic)
    if not tps:
        return []
    reader.assign(tps)
    # Exact ends: the embedded broker lists a partition's end one past the first record
    # of its last batch, which would leave the rest of that batch unread.
    end = await exact_end_offsets(reader, tps)
    start = await reader.offsets_for_times({tp: max(int(since_ms), 0) for tp in tps})
    todo = set()
    for tp in tps:
        found = start.get(tp)
        if found is None:
            continue  # nothing since then
        reader.seek(tp, found.offset)
        if found.offset < end[tp]:
            todo.add(tp)
    out: list[Any] = []
    deadline = time.monotonic() + _READ_TIMEOUT_S
    while todo:
        batch = await reader.getmany(*todo, timeout_ms=_IDLE_POLL_MS)
        for tp, recs in batch.items():
            out.extend(r for r in recs if r.offset < end[tp] and r.timestamp >= since_ms)
        for tp in list(todo):
            if await reader.position(tp) >= end[tp]:
                todo.discard(tp)
        if todo and time.monotonic() > deadline:
            left = {f"{tp.topic}[{tp.partition}]": end[tp] for tp in todo}
            raise BrokerError(
                f"could not read {topic} up to its end offsets {left} within "
                f"{_READ_TIMEOUT_S:.0f} s"
            )
    return out


async def _control(
    settings: Settings, bootstrap: str, monitor: HealthMonitor, registry: Registry | None,
    errors: list[str],
) -> None:
    """Readiness (who stopped on purpose) and what is deployed (what must be served)."""
    view = ControlView(settings, bootstrap)
    try:
        await view.start(catch_up_s=_CONTROL_CATCH_UP_S)
    except (BrokerError, KafkaError) as exc:
        errors.append(f"control topic unreadable: {exc}")
        return
    try:
        for w in view.workers(include_gone=True):
            monitor.observe_readiness(w.worker_id, w.state, float(w.at_ms))
        deployed = {m: d.stable for m, d in view.deployments().items()}
    finally:
        await view.stop()
    if registry is not None:
        for name, entry in registry.entries.items():
            deployed.setdefault(name, entry.default_version)
    for model, version in deployed.items():
        monitor.expect(model, version)


async def _rejections(
    reader: AIOKafkaConsumer, settings: Settings, monitor: HealthMonitor, since_ms: float
) -> int:
    """Requests the router refused over the window, from the DLQ (workers count their own)."""
    source = settings.topic("requests").encode()
    n = 0
    for rec in await _read_since(reader, settings.topic("dlq"), since_ms):
        headers = dict(rec.headers or ())
        if headers.get(DLQ_SOURCE) != source:
            continue
        try:
            model = orjson.loads(rec.value).get("model")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(model, str):
            code = headers.get(DLQ_CODE, b"INTERNAL").decode("utf-8", "replace")
            monitor.observe_rejection(model, code, float(rec.timestamp))
            n += 1
    return n


async def _sample_lanes(
    settings: Settings, bootstrap: str, reader: AIOKafkaConsumer, monitor: HealthMonitor,
    pools: dict[str, set[str]],
) -> None:
    """One sample per lane: records its pool's group has not committed, and the oldest's age.

    Each pool's workers form one consumer group over the lanes of the pool's models; a
    lane partition that group never committed counts from its first record.
    """
    for pool, models in sorted(pools.items()):
        tps = [tp for m in sorted(models) for p in PRIORITIES
               for tp in await _partitions(reader, settings.lane_topic(m, p))]
        if not tps:
            continue
        reader.assign(tps)
        first = await reader.beginning_offsets(tps)
        end = await exact_end_offsets(reader, tps, beginning=first)
        group = settings.model_copy(update={"pool": pool}).worker_group_id()
        committed = await _committed(settings, bootstrap, group, tps)
        now_ms = time.time() * 1000
        by_lane: dict[tuple[str, str], tuple[int, float | None]] = {}
        for tp in tps:
            pos = committed.get(tp)
            pos = first[tp] if pos is None else pos
            backlog = max(end[tp] - pos, 0)
            ts = await _timestamp_at(reader, tp, pos) if backlog else None
            model, priority = tp.topic.rsplit(".", 2)[-2:]
            n, age = by_lane.get((model, priority), (0, None))
            ages = [a for a in (age, now_ms - ts if ts is not None else None) if a is not None]
            by_lane[(model, priority)] = (n + backlog, max(ages) if ages else None)
        for (model, priority), (backlog, age) in by_lane.items():
            monitor.observe_lane(model, priority, now_ms, backlog, age)


async def _committed(
    settings: Settings, bootstrap: str, group: str, tps: list[TopicPartition]
) -> dict[TopicPartition, int | None]:
    """The group's committed offsets (None where it never committed); joins nothing."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False, **settings.kafka_security())
    await consumer.start()
    try:
        return {tp: await consumer.committed(tp) for tp in tps}
    finally:
        await consumer.stop()


async def _timestamp_at(reader: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> float | None:
    reader.seek(tp, offset)
    batch = await reader.getmany(tp, timeout_ms=_IDLE_POLL_MS, max_records=1)
    recs = batch.get(tp) or []
    return float(recs[0].timestamp) if recs else None

