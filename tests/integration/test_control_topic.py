"""The control topic on the real broker: publisher, view, readiness heartbeat."""

from __future__ import annotations

import uuid

from pipeline.control import (
    ControlPublisher,
    ControlView,
    Decision,
    DeploymentState,
    VersionReadiness,
)
from pipeline.readiness import ReadinessAnnouncer
from pipeline.settings import Settings


def _settings(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "topic_prefix": f"ctl-{uuid.uuid4().hex[:8]}", "control_heartbeat_ms": 100,
        "control_expiry_ms": 400,
    })


async def test_a_late_view_reads_the_latest_record_per_key(settings: Settings, broker: str) -> None:
    s = _settings(settings)
    async with ControlPublisher(s, broker) as pub:
        for pct in (5.0, 25.0):
            await pub.publish(DeploymentState(model="m", stable="1", candidate="2",
                                              canary_percent=pct, state="canary", rollout_id="r"))
        await pub.publish(Decision(model="m", seq=1, action="step", stable="1", candidate="2"))
    async with ControlView(s, broker) as view:
        # start() returns only once the topic has been read to its end.
        dep = view.deployment("m")
        assert dep is not None and dep.canary_percent == 25.0
        assert [d.action for d in view.decisions("m")] == ["step"]
        async with ControlPublisher(s, broker) as pub:
            await pub.publish(DeploymentState(model="m", stable="2", state="promoted"))
        assert await view.wait_for(
            lambda v: (d := v.deployment("m")) is not None and d.state == "promoted", 30
        )


async def test_readiness_heartbeat_expiry_and_stopping(settings: Settings, broker: str) -> None:
    s = _settings(settings)
    versions = [VersionReadiness(model="m", version="1", warm=True,
                                 execution_provider="CPUExecutionProvider", warmup_ms=1.5)]
    async with ControlView(s, broker) as view:
        announcer = ReadinessAnnouncer(s, broker, worker_id="w-1", pool="p",
                                       versions=lambda: versions)
        await announcer.start()
        try:
            assert await view.wait_for(lambda v: v.warm_workers("m", "1") == ["w-1"], 30)
            first = view.workers()[0].at_ms
            # Heartbeats keep the record fresh (every 100 ms here).
            assert await view.wait_for(lambda v: v.workers() and v.workers()[0].at_ms > first, 30)
            assert view.workers()[0].pool == "p"
        finally:
            await announcer.stop()
        assert await view.wait_for(lambda v: v.warm_workers("m", "1") == [], 30)
        gone = view.workers(include_gone=True)
        assert [(w.worker_id, w.state, w.versions[0].warm) for w in gone] == [
            ("w-1", "stopping", False)]

        # A worker that dies without a word is dropped once its heartbeat is too old.
        crashed = ReadinessAnnouncer(s, broker, worker_id="w-2", pool="p",
                                     versions=lambda: versions)
        await crashed.start()
        assert await view.wait_for(lambda v: v.warm_workers("m", "1") == ["w-2"], 30)
        assert crashed._task is not None
        crashed._task.cancel()  # the heartbeat stops, as if the process were killed
        await crashed.publisher.stop()
        assert await view.wait_for(lambda v: v.warm_workers("m", "1") == [], 30)
        assert any(w.worker_id == "w-2" and w.state == "ready"
                   for w in view.workers(include_gone=True))
