"""Observability commands: ``inferline cost`` (a cost report) and ``inferline top`` (a live view).

Both read what the stats agent publishes on ``<prefix>.metrics``; ``top`` also
reads the lane offsets of the worker groups (lag) and, when
:mod:`pipeline.health` is there, judges each model's health from the recent
worker telemetry.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipeline.cost import cost_per_1000_usd
from pipeline.errors import InferlineError
from pipeline.metricsfeed import MetricsFeed, TelemetryFeed
from pipeline.rollup import ALL_PRIORITIES, WindowStats
from pipeline.settings import Settings
from pipeline.telemetry import Heartbeat, RequestSummary
from pipeline.topics import PRIORITIES, exact_end_offsets

NO_HEALTH = "-"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``cost`` and ``top`` to the ``inferline`` command."""
    cost = sub.add_parser(
        "cost", help="cost per model from the metrics topic: compute, idle, per 1,000"
    )
    cost.add_argument("--since-minutes", type=float, default=None,
                      help="only windows that ended in the last N minutes (default: all)")
    cost.set_defaults(func=cmd_cost)
    top = sub.add_parser(
        "top", help="live view per model: throughput, p99, lag, batch size, cost, health"
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--refresh-s", type=float, default=1.0, help="seconds between frames")
    top.set_defaults(func=cmd_top)


def _bootstrap(settings: Settings) -> str:
    if not settings.bootstrap_servers:
        raise InferlineError(
            "set INFERLINE_BOOTSTRAP_SERVERS to the cluster whose metrics to read "
            "(an embedded broker started for this command would have none)"
        )
    return settings.bootstrap_servers


def _console() -> Console:
    # A fixed width keeps reports the same whether or not stdout is a terminal.
    return Console(width=140, soft_wrap=False)


def _usd(v: float) -> str:
    return f"${v:.6f}" if v < 1 else f"${v:,.2f}"


def _pct(v: float | None) -> str:
    # Three significant digits: a lightly used pool shows 0.0123%, not 0.0%.
    return "-" if v is None else f"{100 * v:.3g}%"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


# -- inferline cost ----------------------------------------------------------------


@dataclass
class CostRow:
    """One model version's totals over the windows read."""

    model: str
    version: str
    requests: int = 0
    ok: int = 0
    compute_usd: float = 0.0
    idle_usd: float = 0.0
    total_usd: float = 0.0
    busy_s: float = 0.0
    capacity_s: float = 0.0
    windows: int = 0

    @property
    def per_1000_usd(self) -> float:
        """Total cost (compute and idle) per 1,000 ok answers."""
        return cost_per_1000_usd(self.total_usd, self.ok)

    @property
    def utilization(self) -> float | None:
        """Compute seconds over attributed worker seconds."""
        return self.busy_s / self.capacity_s if self.capacity_s > 0 else None


def cost_rows(records: Iterable[WindowStats], *, since_ms: float | None = None) -> list[CostRow]:
    """Totals per model version of the all-priorities records (sorted by model, version)."""
    rows: dict[tuple[str, str], CostRow] = {}
    for r in records:
        if r.priority != ALL_PRIORITIES or (since_ms is not None and r.window_end_ms < since_ms):
            continue
        row = rows.get((r.model, r.version))
        if row is None:
            row = rows[(r.model, r.version)] = CostRow(r.model, r.version)
        row.requests += r.count
        row.ok += r.ok
        row.compute_usd += r.compute_cost_usd
        row.idle_usd += r.idle_cost_usd
        row.total_usd += r.total_cost_usd
        row.busy_s += r.busy_s
        row.capacity_s += r.capacity_s
        row.windows += 1
    return [rows[k] for k in sorted(rows)]


def cost_table(rows: Sequence[CostRow]) -> Table:
    """The cost report as a table, with a total row."""
    t = Table(title="cost per model (compute + idle capacity)", title_justify="left")
    for name in ("model", "version", "requests", "ok", "compute", "idle", "total",
                 "per 1,000", "utilization", "windows"):
        t.add_column(name, justify="left" if name in ("model", "version") else "right")
    for r in rows:
        t.add_row(r.model, r.version, f"{r.requests:,}", f"{r.ok:,}", _usd(r.compute_usd),
                  _usd(r.idle_usd), _usd(r.total_usd), _usd(r.per_1000_usd),
                  _pct(r.utilization), str(r.windows))
    if rows:
        tot = CostRow("all", "", sum(r.requests for r in rows), sum(r.ok for r in rows),
                      sum(r.compute_usd for r in rows), sum(r.idle_usd for r in rows),
                      sum(r.total_usd for r in rows), sum(r.busy_s for r in rows),
                      sum(r.capacity_s for r in rows))
        t.add_section()
        t.add_row("all", "", f"{tot.requests:,}", f"{tot.ok:,}", _usd(tot.compute_usd),
                  _usd(tot.idle_usd), _usd(tot.total_usd), _usd(tot.per_1000_usd),
                  _pct(tot.utilization), "")
    return t


def cmd_cost(settings: Settings, args: argparse.Namespace) -> int:
    """Print the cost report of every model version."""
    since_ms = (
        time.time() * 1000 - args.since_minutes * 60_000 if args.since_minutes is not None
        else None
    )
    rows = asyncio.run(_read_costs(settings, _bootstrap(settings), since_ms))
    console = _console()
    if not rows:
        console.print(f"no metrics on {settings.topic('metrics')} yet: are workers and a "
                      "stats agent (inferline serve --role stats) running?")
        return 1
    console.print(cost_table(rows))
    return 0


async def _read_costs(settings: Settings, bootstrap: str, since_ms: float | None) -> list[CostRow]:
    async with MetricsFeed(settings, bootstrap) as feed:
        return cost_rows(await feed.catch_up(), since_ms=since_ms)


# -- inferline top -----------------------------------------------------------------


@dataclass
class TopRow:
    """The latest complete window of one model version, and what else top knows of it."""

    stats: WindowStats
    lag: int | None = None
    health: str = NO_HEALTH


class TopView:
    """State of the live view: latest window per model version, lag, health."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.latest: dict[tuple[str, str], WindowStats] = {}
        self.lag: dict[str, int] = {}
        self.health: dict[tuple[str, str], str] = {}
        self.health_note = ""
        self.monitor = _health_monitor(settings)
        if self.monitor is None:
            self.health_note = "health: pipeline.health is not available, shown as '-'"

    def add_metrics(self, records: Iterable[WindowStats]) -> None:
        """Keep the most recent all-priorities window of each model version."""
        for r in records:
            if r.priority != ALL_PRIORITIES:
                continue
            have = self.latest.get((r.model, r.version))
            if have is None or r.window_start_ms >= have.window_start_ms:
                self.latest[(r.model, r.version)] = r

    def add_telemetry(self, records: Iterable[RequestSummary | Heartbeat]) -> None:
        """Feed the health monitor (when there is one)."""
        if self.monitor is not None:
            for rec in records:
                self.monitor.observe(rec)

    def assess(self, now_ms: float) -> None:
        """Judge each model version's health now."""
        if self.monitor is None:
            return
        for key in self.latest:
            self.monitor.expect(*key)
        self.health = {k: v.state for k, v in self.monitor.assess(now_ms).items()}

    def rows(self) -> list[TopRow]:
        """One row per model version, sorted."""
        return [
            TopRow(s, self.lag.get(s.model), self.health.get(k, NO_HEALTH))
            for k, s in sorted(self.latest.items())
        ]

    def render(self) -> Group:
        """One frame."""
        t = Table(title=f"inferline top — {self.settings.topic_prefix}", title_justify="left")
        for name in ("model", "version", "req/s", "p50 ms", "p99 ms", "errors", "lag",
                     "batch", "per 1,000", "util", "workers", "health", "window"):
            t.add_column(name, justify="left" if name in ("model", "version", "health")
                         else "right")
        for row in self.rows():
            s = row.stats
            t.add_row(
                s.model, s.version, f"{s.throughput_rps:.1f}", _ms(s.p50_ms), _ms(s.p99_ms),
                _pct(s.error_rate), "-" if row.lag is None else f"{row.lag:,}",
                "-" if s.mean_batch_size is None else f"{s.mean_batch_size:.1f}",
                _usd(s.cost_per_1000_usd), _pct(s.utilization), str(len(s.workers)),
                row.health, time.strftime("%H:%M:%S", time.localtime(s.window_end_ms / 1000)),
            )
        parts: list[Any] = [t]
        if not self.latest:
            parts.append(Text(f"no windows on {self.settings.topic('metrics')} yet"))
        if self.health_note:
            parts.append(Text(self.health_note, style="dim"))
        return Group(*parts)


def _health_monitor(settings: Settings) -> Any:
    """A health monitor when pipeline.health is installed, else None."""
    try:
        from pipeline.health import HealthMonitor, HealthThresholds
    except ImportError:
        return None
    return HealthMonitor(HealthThresholds.from_settings(settings))


async def lane_lag(settings: Settings, bootstrap: str, models: Iterable[str]) -> dict[str, int]:
    """Records in each model's lanes that no worker group has committed yet."""
    models = sorted(set(models))
    if not models:
        return {}
    lanes = {settings.lane_topic(m, p): m for m in models for p in PRIORITIES}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **settings.kafka_security())
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                fetch_max_wait_ms=settings.fetch_max_wait_ms,
                                **settings.kafka_security())
    try:
        await admin.start()
        await consumer.start()
        for topic in lanes:
            consumer._client.add_topic(topic)
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for topic in lanes
               for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        end = await exact_end_offsets(consumer, tps)
        # Workers of every pool commit lane offsets in their pool's group.
        prefix = settings.group_id("worker")
        groups = [g[0] for g in await admin.list_consumer_groups()
                  if isinstance(g[0], str) and g[0].startswith(prefix)]
        committed: dict[TopicPartition, int] = {}
        for group in groups:
            # Naming the partitions: the embedded broker's answer to "all of them" is
            # one the client cannot parse.
            offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
            for tp, meta in offsets.items():
                if meta is not None and meta.offset >= 0:
                    committed[tp] = max(committed.get(tp, 0), meta.offset)
    finally:
        await consumer.stop()
        await admin.close()
    lag = dict.fromkeys(models, 0)
    for tp, end_offset in end.items():
        lag[lanes[tp.topic]] += max(end_offset - committed.get(tp, 0), 0)
    return lag


def cmd_top(settings: Settings, args: argparse.Namespace) -> int:
    """Show the live view (or one frame with --once)."""
    return asyncio.run(_top(settings, _bootstrap(settings), once=args.once,
                            refresh_s=args.refresh_s))


async def _top(settings: Settings, bootstrap: str, *, once: bool, refresh_s: float) -> int:
    view = TopView(settings)
    # Health is judged on the recent telemetry only.
    window_s = float(getattr(settings, "health_window_s", 60.0))
    since_ms = int(time.time() * 1000 - window_s * 1000)
    console = _console()
    async with MetricsFeed(settings, bootstrap) as metrics, \
            TelemetryFeed(settings, bootstrap, since_ms=since_ms) as telemetry:
        view.add_metrics(await metrics.catch_up())
        view.add_telemetry(await telemetry.catch_up())
        await _refresh(view, settings, bootstrap)
        if once:
            console.print(view.render())
            return 0
        with Live(view.render(), console=console, auto_refresh=False) as live:
            while True:
                view.add_metrics(await metrics.poll(int(refresh_s * 500)))
                view.add_telemetry(await telemetry.poll(int(refresh_s * 500)))
                await _refresh(view, settings, bootstrap)
                live.update(view.render(), refresh=True)


async def _refresh(view: TopView, settings: Settings, bootstrap: str) -> None:
    try:
        view.lag = await lane_lag(settings, bootstrap, {m for m, _ in view.latest})
    except KafkaError:
        view.lag = {}  # shown as "-": the view keeps going while the broker hiccups
    view.assess(time.time() * 1000)
