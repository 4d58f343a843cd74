"""Health gauges for Prometheus: the stats process follows telemetry and judges every second.

The same :class:`pipeline.health.HealthMonitor` as ``inferline status``, fed
continuously from ``<prefix>.telemetry`` (from ``health_history_s`` back, so that
each version's first rows make its drift reference) and the control topic's
readiness records; every interval its verdicts go to the ``inferline_model_health``
and ``inferline_output_drift_*`` gauges, which the model-degradation alerts read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from mode import Service
from pydantic import ValidationError

from agents.runtime import Runtime
from pipeline.consumer import quietly
from pipeline.control import ControlView
from pipeline.drift import load_references
from pipeline.health import HealthMonitor, HealthThresholds, export_gauges
from pipeline.tasks import cancel_and_wait
from pipeline.telemetry import decode_record

log = logging.getLogger("inferline.health")

ASSESS_INTERVAL_S = 1.0
# The exporter assesses once a second: its metrics reader need not poll faster.
HEALTH_FETCH_WAIT_MS = 100
HISTORY_S = 3600.0


class HealthExporter:
    """Follows telemetry and readiness; sets the health and drift gauges every interval."""

    def __init__(self, rt: Runtime, *, interval_s: float = ASSESS_INTERVAL_S,
                 history_s: float = HISTORY_S) -> None:
        s = rt.settings
        self.rt = rt
        self.interval_s = interval_s
        self.history_s = history_s
        refs = load_references(s.drift_reference_file) if s.drift_reference_file else {}
        self.monitor = HealthMonitor(
            HealthThresholds.from_settings(s), references=refs,
            preferred_providers={(v.name, v.version): v.execution_provider for v in rt.registry},
        )
        for name, entry in rt.registry.entries.items():
            self.monitor.expect(name, entry.default_version)
        self.control = ControlView(s, rt.bootstrap_servers)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the control topic, seek telemetry ``history_s`` back, start judging."""
        if self._task is not None:
            return
        s = self.rt.settings
        await self.control.start()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.rt.bootstrap_servers, enable_auto_commit=False,
            fetch_max_wait_ms=s.fetch_wait_ms(HEALTH_FETCH_WAIT_MS), **s.kafka_security(),
        )
        await consumer.start()
        try:
            topic = s.topic("telemetry")
            consumer._client.add_topic(topic)
            await consumer._client.force_metadata_update()
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                            or ())]
            consumer.assign(tps)
            since = int((time.time() - self.history_s) * 1000)
            found = await consumer.offsets_for_times({tp: since for tp in tps})
            for tp in tps:
                at = found.get(tp)
                if at is None:
                    await consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, at.offset)
        except BaseException:
            await quietly(consumer.stop())
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(consumer), name="health-export")

    async def stop(self) -> None:
        """Stop judging and reading (idempotent)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await quietly(consumer.stop())
        await self.control.stop()

    def assess(self, now_ms: float | None = None) -> None:
        """Judge now and set the gauges."""
        for w in self.control.workers(include_gone=True):
            self.monitor.observe_readiness(w.worker_id, w.state, float(w.at_ms))
        healths = self.monitor.assess(now_ms if now_ms is not None else time.time() * 1000)
        export_gauges(self.rt.metrics, healths)

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        next_at = time.monotonic()
        failures = 0
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=int(self.interval_s * 1000))
                failures = 0
            except KafkaError as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("reading telemetry failed %d time(s): %r", failures, exc)
                self.monitor.observe_broker_error(repr(exc), time.time() * 1000)
                batch = {}
                await asyncio.sleep(min(0.1 * failures, 2.0))
            for records in batch.values():
                for rec in records:
                    with contextlib.suppress(ValidationError):
                        self.monitor.observe(decode_record(rec.value))
            if time.monotonic() >= next_at:
                next_at = time.monotonic() + self.interval_s
                self.assess()


def install(app: faust.App, rt: Runtime) -> HealthExporter:
    """Run a :class:`HealthExporter` as a service of ``app``."""
    exporter = HealthExporter(rt)

    @app.service
    class HealthService(Service):
        async def on_start(self) -> None:
            await exporter.start()

        async def on_stop(self) -> None:
            await exporter.stop()

    return exporter
