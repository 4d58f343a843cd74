"""A worker's readiness on the control topic: after warm-up, as a heartbeat, and at stop.

The worker publishes its record after every version is loaded and warmed and
before it joins its consumer group, so a router that sees it warm knows the
worker will take the version's requests without a cold start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Literal, Protocol

from pipeline.control import ControlPublisher, VersionReadiness, WorkerReadiness
from pipeline.errors import BrokerError
from pipeline.registry import ModelVersion
from pipeline.session import ModelSession
from pipeline.settings import Settings
from pipeline.tasks import cancel_and_wait

log = logging.getLogger("inferline.readiness")


class ReadinessAnnouncer:
    """A worker's readiness record: published at start, as a heartbeat, and at stop.

    ``versions`` is called at each beat, so the record follows the worker's state.
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        *,
        worker_id: str,
        pool: str,
        versions: Callable[[], list[VersionReadiness]],
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.pool = pool
        self.versions = versions
        self.publisher = ControlPublisher(settings, bootstrap_servers)
        self._task: asyncio.Task[None] | None = None

    def record(self, state: Literal["ready", "stopping"] = "ready") -> WorkerReadiness:
        """The record this worker publishes now."""
        versions = self.versions()
        if state == "stopping":
            versions = [v.model_copy(update={"warm": False}) for v in versions]
        return WorkerReadiness(
            worker_id=self.worker_id, pool=self.pool, state=state, versions=versions,
            heartbeat_ms=self.settings.control_heartbeat_ms,
        )

    async def start(self) -> None:
        """Publish readiness now, then keep beating (idempotent)."""
        if self._task is not None:
            return
        await self.publisher.start()
        record = self.record()
        await self.publisher.publish(record)
        warm = [f"{v.model}:{v.version}" for v in record.versions if v.warm]
        log.info("worker %s (pool %s) ready: warm %s", self.worker_id, self.pool,
                 ", ".join(warm) or "nothing")
        self._task = asyncio.create_task(self._beat(), name="readiness-heartbeat")

    async def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop beating and publish ``stopping`` (bounded by ``timeout_s``; idempotent)."""
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)
        try:
            await asyncio.wait_for(self.publisher.publish(self.record("stopping")), timeout_s)
        except (BrokerError, TimeoutError) as exc:
            log.warning("could not publish that worker %s is stopping: %r", self.worker_id, exc)
        await self.publisher.stop()

    async def _beat(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.settings.control_heartbeat_ms / 1000)
            try:
                await self.publisher.publish(self.record())
                failures = 0
            except BrokerError as exc:
                failures += 1
                if failures == 1 or failures % 64 == 0:
                    log.warning("readiness heartbeat failed %d time(s): %s", failures, exc)


class _Served(Protocol):
    spec: ModelVersion
    session: ModelSession


def served_readiness(served: Iterable[_Served]) -> list[VersionReadiness]:
    """The readiness of a worker's served versions (objects with ``spec`` and ``session``)."""
    return [
        VersionReadiness(
            model=s.spec.name,
            version=s.spec.version,
            warm=s.session.warm,
            execution_provider=s.session.execution_provider if s.session.loaded else "",
            warmup_ms=round(s.session.warmup_s * 1000, 3),
        )
        for s in served
    ]
