"""The router's routing table: per model, which version serves and which are warm.

Built from the registry (default versions), the control topic's deployment
records (stable version, canary and shadow percentages) and its worker
readiness records (which versions some live worker has warm), and rebuilt when
the control view changes or a heartbeat may have expired. It logs one line each
time a routed version goes cold or warm again, and keeps the router's gating
metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from pipeline.control import ControlView
from pipeline.metrics import Metrics
from pipeline.registry import Registry
from pipeline.rollout import ModelPlan, Route
from pipeline.settings import Settings
from pipeline.tasks import cancel_and_wait

log = logging.getLogger("inferline.gating")

# Heartbeats expire with the clock, not with a record: look again this often.
_REBUILD_EVERY_S = 0.5


class RoutingTable:
    """One :class:`~pipeline.rollout.ModelPlan` per registered model."""

    def __init__(
        self, settings: Settings, registry: Registry, view: ControlView, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.view = view
        self.metrics = metrics
        self.plans: dict[str, ModelPlan] = {}
        self._revision = -1
        self._built_at = 0.0
        self._cold: set[tuple[str, str]] = set()
        self._warned: set[str] = set()
        self._children: dict[tuple[str, str, str], Any] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Build now, then keep the plans, logs and gauges current without traffic too."""
        if self._task is not None:
            return
        self.build()
        self._task = asyncio.create_task(self._follow(), name="routing-table")

    async def stop(self) -> None:
        """Stop following the control view (idempotent)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(_REBUILD_EVERY_S)
            self.refresh()

    def refresh(self) -> None:
        """Rebuild the plans when the control view changed or may have expired workers."""
        now = time.monotonic()
        if self.view.revision == self._revision and now - self._built_at < _REBUILD_EVERY_S:
            return
        self._revision = self.view.revision
        self._built_at = now
        self.build()

    def build(self) -> None:
        """Rebuild every model's plan now."""
        s = self.settings
        warm = self.view.warm_versions()
        plans: dict[str, ModelPlan] = {}
        for name, entry in self.registry.entries.items():
            known = {v.version for v in entry.versions}
            stable, candidate, canary, shadow = entry.default_version, None, 0.0, 0.0
            dep = self.view.deployment(name)
            if dep is not None:
                if dep.stable in known:
                    stable = dep.stable
                else:
                    self._warn_once(f"{name}:{dep.stable}", f"deployment of {name} names stable "
                                    f"version {dep.stable!r}, not in this router's registry; "
                                    f"serving {stable}")
                if dep.active and dep.candidate in known:
                    candidate = dep.candidate
                    canary, shadow = dep.canary_percent, dep.shadow_percent
                elif dep.active:
                    self._warn_once(f"{name}:{dep.candidate}", f"rollout of {name} names version "
                                    f"{dep.candidate!r}, not in this router's registry; ignored")
            plan = ModelPlan(
                name, stable, candidate=candidate, canary_percent=canary,
                shadow_percent=shadow, sample_percent=s.rollout_sample_percent,
                warm=warm.get(name, ()), policy=s.cold_policy,
            )
            plans[name] = plan
            for v in entry.versions:
                self.metrics.warm_workers.labels(name, v.version).set(
                    len(self.view.warm_workers(name, v.version))
                )
            routed = {stable} | ({candidate} if plan.active and candidate else set())
            self._note_transitions(plan, routed)
        self.plans = plans

    def _note_transitions(self, plan: ModelPlan, routed: set[str]) -> None:
        for version in sorted(routed):
            key = (plan.model, version)
            cold = version not in plan.warm
            if cold and key not in self._cold:
                self._cold.add(key)
                if self.settings.cold_policy == "stable" and version != plan.stable:
                    then = f"routing its requests to stable {plan.model}:{plan.stable}"
                else:
                    then = "forwarding its requests to the lane, where they wait in Kafka"
                log.warning("gating: %s:%s has no warm worker; %s (INFERLINE_COLD_POLICY=%s)",
                            plan.model, version, then, self.settings.cold_policy)
            elif not cold and key in self._cold:
                self._cold.discard(key)
                log.info("gating: %s:%s is warm on %s; routing to it", plan.model, version,
                         ", ".join(self.view.warm_workers(plan.model, version)))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def count(self, model: str, route: Route) -> None:
        """Account one routed request in the gating and rollout metrics."""
        self._child("version", model, route.version, route.arm).inc()
        if route.shadow is not None:
            self._child("version", model, route.shadow, "shadow").inc()
        if route.rerouted_from is not None:
            self._child("cold", model, route.rerouted_from, "rerouted").inc()
        elif route.cold:
            self._child("cold", model, route.version, "held").inc()

    def _child(self, kind: str, model: str, version: str, label: str) -> Any:
        key = (f"{kind}:{model}", version, label)
        child = self._children.get(key)
        if child is None:
            family = self.metrics.routed_version if kind == "version" else self.metrics.routed_cold
            child = self._children[key] = family.labels(model, version, label)
        return child
