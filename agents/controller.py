"""The canary controller: judges each rollout and steps, promotes or rolls it back.

It reads the responses the workers copy to ``<prefix>.rollout`` (a sample of
both arms, marked by the router) and the shadow responses answered there, keeps
sliding windows per rollout (:class:`pipeline.rollout.RolloutTracker`), and
every ``controller_interval_ms`` judges the active rollouts of the control
topic against their models' registry policies. Each decision is a record on the
control topic and a log line with its reason and figures.

The rollout topic has one partition and the controller consumes it in a group,
so when several controllers run, the one holding the partition decides and the
others wait as standbys.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import faust
import numpy as np
from mode import Service

from agents.runtime import Runtime
from pipeline import codec, deploy
from pipeline.consumer import BatchConsumer
from pipeline.control import ControlPublisher, ControlView, DeploymentState, now_ms
from pipeline.errors import InferlineError
from pipeline.response_consumer import ResponseParser
from pipeline.rollout import RolloutTracker, Verdict, comparison, judge, next_step
from pipeline.tasks import cancel_and_wait
from schemas.messages import Tensor

log = logging.getLogger("inferline.controller")


class Controller:
    """Judges the active rollouts of the registry's models."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        s = rt.settings
        self.view = ControlView(s, rt.bootstrap_servers)
        self.publisher = ControlPublisher(s, rt.bootstrap_servers)
        self.consumer = BatchConsumer(
            s, rt.bootstrap_servers, topics=[s.topic("rollout")],
            group_id=s.group_id("controller"), handler=self.handle, name="controller",
        )
        self.parser = ResponseParser("controller")
        self.trackers: dict[str, RolloutTracker] = {}
        self._steps: dict[str, tuple[float, int]] = {}
        self._shadow_passed: set[str] = set()
        self._seq: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the control topic, join the controller group, start judging (idempotent)."""
        if self._task is not None:
            return
        await self.view.start()
        await self.publisher.start()
        await self.consumer.start()
        self._task = asyncio.create_task(self._loop(), name="controller")

    async def stop(self) -> None:
        """Stop judging and leave the group (idempotent)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self.consumer.stop()
        await self.publisher.stop()
        await self.view.stop()

    async def handle(self, records: Sequence[Any]) -> None:
        """Account a batch of copied and shadow responses in their rollouts' windows."""
        for msg in records:
            resp = self.parser.parse(msg.value, msg.topic, msg.partition, msg.offset)
            if resp is None:
                continue
            tracker = self.trackers.get(resp.model)
            if tracker is None:
                continue
            ok = resp.status == "ok"
            out = next((o for o in resp.outputs if o.name == tracker.output), None) if ok else None
            tracker.add(
                resp.id, resp.version, ok,
                resp.timing.total_ms if ok and resp.timing is not None else None,
                {out.name: _values(out)} if out is not None else None,
            )

    async def _loop(self) -> None:
        interval_s = self.rt.settings.controller_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
            except InferlineError as exc:
                log.warning("judging rollouts failed: %s; trying again", exc)

    async def tick(self) -> None:
        """Judge every active rollout once, acting on the verdicts that are ready."""
        deployments = self.view.deployments()
        for model in list(self.trackers):
            dep = deployments.get(model)
            if dep is None or not dep.active:
                del self.trackers[model]
        for dep in deployments.values():
            if dep.active:
                await self._judge(dep)

    def _tracker(self, dep: DeploymentState) -> RolloutTracker | None:
        entry = self.rt.registry.entries.get(dep.model)
        if entry is None or dep.candidate not in {v.version for v in entry.versions}:
            return None
        tracker = self.trackers.get(dep.model)
        if tracker is None or tracker.rollout_id != dep.rollout_id:
            output, metric = comparison(entry)
            window = self.rt.settings.rollout_window or entry.rollout.window
            assert dep.candidate is not None
            tracker = RolloutTracker(dep.rollout_id, dep.stable, dep.candidate, window=window,
                                     output=output, metric=metric)
            self.trackers[dep.model] = tracker
            self._shadow_passed.discard(dep.model)
            log.info("rollout %s %s: judging %s against %s on %s (%s agreement), window %d",
                     dep.model, dep.rollout_id, dep.candidate, dep.stable, output, metric, window)
        step = (dep.canary_percent, dep.step_started_ms)
        if self._steps.get(dep.model) != step:
            self._steps[dep.model] = step
            tracker.new_step()
        return tracker

    async def _judge(self, dep: DeploymentState) -> None:
        tracker = self._tracker(dep)
        if tracker is None:
            return
        entry = self.rt.registry.entries[dep.model]
        spec = self.rt.registry.resolve(dep.model, tracker.candidate)
        verdict = judge(entry.rollout, tracker.figures(), window=tracker.window,
                        slo_p99_ms=spec.slo_p99_ms, needs_pairs=dep.shadow_percent > 0)
        if not verdict.ready:
            return
        by = f"controller {self.rt.worker_id}"
        if not verdict.passed:
            after = deploy.stop(dep, aborted=False, reason=f"rolled back: {verdict.reason}",
                                figures=verdict.figures, by=by)
            await self._publish(dep, after, "rollback", verdict)
        elif dep.state == "shadow":
            if dep.model not in self._shadow_passed:
                self._shadow_passed.add(dep.model)
                after = dep.model_copy(update={
                    "reason": f"shadow within thresholds: {verdict.reason}",
                    "figures": verdict.figures, "updated_by": by,
                    "updated_at_ms": now_ms(),
                })
                await self._publish(dep, after, "shadow_passed", verdict)
        elif now_ms() - dep.step_started_ms >= self.rt.settings.rollout_step_min_ms:
            to = next_step(entry.rollout.steps, dep.canary_percent)
            action = "promote" if to >= 100 else "step"
            after = deploy.advance(dep, to, reason=f"{action} to {to:g}%: {verdict.reason}",
                                   figures=verdict.figures, by=by)
            await self._publish(dep, after, action, verdict)

    async def _publish(
        self, before: DeploymentState, after: DeploymentState, action: Any, verdict: Verdict
    ) -> None:
        latest = self.view.deployment(before.model)
        if latest is None or latest.updated_at_ms != before.updated_at_ms:
            return  # changed under us (e.g. aborted by hand): judge the new state next time
        seq = max(self.view.next_seq(before.model), self._seq.get(before.model, 0) + 1)
        self._seq[before.model] = seq
        decision = await deploy.publish_transition(self.publisher, self.view, before, after,
                                                   action, seq=seq)
        self.rt.metrics.rollout_decisions.labels(before.model, action).inc()
        f = verdict.figures
        log.info("decision %s:%d %s %s -> %s: %s [stable n=%d, candidate n=%d, pairs=%d]",
                 decision.model, decision.seq, action, decision.stable, decision.candidate,
                 after.reason, f.stable_n, f.candidate_n, f.pairs)
        # Our own records have not come back through the view yet: judge from them next tick.
        self.view.remember(decision)
        self.view.remember(after)


def install(app: faust.App, rt: Runtime) -> Controller:
    """Run the canary controller as a service of ``app``."""
    controller = Controller(rt)

    @app.service
    class ControllerService(Service):
        async def on_start(self) -> None:
            await controller.start()

        async def on_stop(self) -> None:
            await controller.stop()

    return controller


def _values(out: Tensor) -> np.ndarray[Any, Any]:
    # A copy of a request that asked for binary_data_output holds a base64 buffer.
    if codec.is_buffer(out.datatype, out.parameters):
        return codec.to_numpy(out)
    return np.asarray(out.data).reshape(out.shape)
