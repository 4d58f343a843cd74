"""Running router and worker roles as long-lived Faust worker processes."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Sequence
from typing import Literal

import faust

from agents import controller, health_export, router, stats, worker
from agents.app import create_app
from agents.runtime import Runtime
from pipeline.errors import BrokerError
from pipeline.registry import Registry
from pipeline.settings import Settings
from pipeline.topics import ensure_topics, fixed_topics, lane_topics

log = logging.getLogger("inferline.serve")

Role = Literal["router", "worker", "all", "stats", "controller"]
_FAUST_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error"}


def build_app(
    settings: Settings, bootstrap_servers: str, role: Role, models: Sequence[str] | None = None
) -> faust.App:
    """A configured Faust app for ``role``: agents installed, models loaded and warmed."""
    rt = Runtime.build(settings, bootstrap_servers)
    served = served_models(settings, rt.registry, role, models)
    # The Faust app hosts the agents; its own group is apart from the agents' groups.
    # Only the stats role has Faust agents and a table for the app's consumer to feed.
    app = create_app(rt, app_id=settings.group_id(f"{role}-app"), consumes=role == "stats")
    if role in ("router", "all"):
        router.install(app, rt)
    if role in ("worker", "all"):
        worker.install(app, rt, served)
    if role == "stats":
        stats.install(app, rt)
        health_export.install(app, rt)
    if role in ("controller", "all"):
        controller.install(app, rt)
    rt.metrics.serve(settings.metrics_port, settings.metrics_host)
    groups = [settings.group_id(r) for r in ("router", "controller") if role in (r, "all")]
    if role in ("worker", "all"):
        groups.append(settings.worker_group_id())
    log.info(
        "inferline %s %s on %s: groups %s, models %s",
        role, settings.worker_id, bootstrap_servers, ", ".join(groups), ", ".join(served),
    )
    return app


def served_models(
    settings: Settings, registry: Registry, role: Role, models: Sequence[str] | None
) -> list[str]:
    """The models a role serves: a worker those of its pool (``--models`` narrows them)."""
    if role in ("worker", "all"):
        return registry.served_models(settings.pool, models)
    return list(models) if models else registry.names()


async def wait_for_broker(
    settings: Settings, bootstrap_servers: str, models: Sequence[str], *, max_backoff_s: float = 10
) -> None:
    """Prepare the topics, waiting as long as it takes for the broker to answer.

    A process started before its broker (or while it is down) waits here with
    growing pauses and one log line per attempt, instead of exiting and being
    restarted in a loop by its supervisor.
    """
    backoff_s = 0.5
    attempt = 0
    while True:
        attempt += 1
        try:
            await prepare_topics(settings, bootstrap_servers, models)
            if attempt > 1:
                log.info("broker %s answered after %d attempts", bootstrap_servers, attempt)
            return
        except BrokerError as exc:
            log.warning("broker not ready (attempt %d, next in %.1fs): %s", attempt, backoff_s, exc)
        await asyncio.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, max_backoff_s)


async def prepare_topics(settings: Settings, bootstrap_servers: str, models: Sequence[str]) -> None:
    """Create the fixed topics and the lanes of ``models`` if they are missing."""
    await ensure_topics(
        settings,
        bootstrap_servers,
        [*fixed_topics(settings), *lane_topics(settings, models)],
        compacted=[settings.topic("control")],
    )
    # One partition: the controller group's single owner of it is the one that decides.
    await ensure_topics(settings, bootstrap_servers, [settings.topic("rollout")], partitions=1)


class _Worker(faust.Worker):
    """Faust's worker, with the Kafka client libraries' loggers kept off DEBUG.

    A DEBUG-enabled aiokafka logger builds a log record for every message sent,
    which showed up as several percent of a router's time.
    """

    def _setup_logging(self) -> None:
        super()._setup_logging()
        for name in ("aiokafka", "faust", "mode"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _install_uvloop() -> None:
    """Use uvloop when installed: its callbacks and socket I/O cost less per message."""
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed; using the asyncio event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(
    settings: Settings, bootstrap_servers: str, role: Role, models: Sequence[str] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT; Faust stops the agents and commits on the way out."""
    if settings.uvloop:
        _install_uvloop()
    registry = Runtime.build(settings, bootstrap_servers).registry
    served = served_models(settings, registry, role, models)
    # A router writes to every model's lanes, whichever pools serve them.
    lanes = registry.names() if role in ("router", "all") else served
    asyncio.run(wait_for_broker(settings, bootstrap_servers, lanes))
    app = build_app(settings, bootstrap_servers, role, served)
    # Everything loaded so far (modules, models, the app) lives as long as the
    # process: keep it out of the collector's full passes, which otherwise walk
    # it again and again under a steady stream of short-lived message objects.
    gc.collect()
    gc.freeze()
    # Each message allocates a few dozen short-lived objects; collecting every
    # 700 allocations (the default) spends more time walking than freeing.
    gc.set_threshold(50_000, 20, 20)
    _Worker(
        app,
        loglevel=_FAUST_LEVELS[settings.log_level],
        quiet=True,
        redirect_stdouts=False,
    ).execute_from_commandline()
