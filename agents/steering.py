"""Steering a worker's lane consumer: which lanes it fetches, how long each fetch may wait.

After every poll and every batch the schedulers say which lanes to pause
(:meth:`pipeline.scheduler.ModelScheduler.paused_lanes`); the lane gauges
(paused, backlog, age of the oldest waiting record) are published at the same
time. The fetch wait is asked for as each fetch request is built: while every
executor of every served model computes, a record fetched sooner could not start
sooner, so the fetch may wait until the first of them is expected to be free;
and once no record has come for a while, the fetch waits as an idle router's does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from aiokafka import TopicPartition

from agents.runtime import Runtime
from pipeline.lanes import LaneConsumer
from pipeline.scheduler import ModelScheduler, busy_fetch_wait_ms
from pipeline.topics import PRIORITIES


class LaneSteering:
    """Pausing, fetch waits and lane gauges for one worker's models."""

    def __init__(
        self, rt: Runtime, models: Iterable[str], schedulers: dict[str, ModelScheduler]
    ) -> None:
        """``schedulers`` is the worker's own map, filled once its models are loaded."""
        self.settings = s = rt.settings
        self.models = sorted(set(models))
        self.schedulers = schedulers
        self.lane_of: dict[str, tuple[str, str]] = {
            s.lane_topic(m, p): (m, p) for m in self.models for p in PRIORITIES
        }
        self._backlog_since: dict[tuple[str, str], float] = {}
        self._last_fetch_wait_ms = s.fetch_max_wait_ms
        # Set by the worker once its lane consumer exists (GroupMember.idle_aware_wait_ms).
        self.idle_wait_ms: Callable[[], int] | None = None
        # Set after every poll and batch: look their children up once.
        m = rt.metrics
        self._lane_gauges = {
            (model, p): (m.lane_paused.labels(model, p), m.lane_backlog.labels(model, p),
                         m.lane_lag.labels(model, p))
            for model in self.models for p in PRIORITIES
        }
        self._inflight_gauges = {model: m.inflight.labels(model) for model in self.models}

    def steer(self, consumer: LaneConsumer) -> None:
        """Pause and resume lanes as the schedulers want; publish lane metrics."""
        assigned = consumer.assignment()
        by_lane: dict[tuple[str, str], list[TopicPartition]] = {}
        for tp in assigned:
            lane = self.lane_of.get(tp.topic)
            if lane is not None:
                by_lane.setdefault(lane, []).append(tp)
        wanted: set[TopicPartition] = set()
        gauges = self._lane_gauges
        now = time.time()
        for model, sched in self.schedulers.items():
            backlog = {
                p: sum(consumer.backlog(tp) for tp in by_lane.get((model, p), ()))
                for p in PRIORITIES
            }
            paused = sched.paused_lanes(backlog)
            for p in PRIORITIES:
                is_paused = p in paused
                if is_paused:
                    wanted.update(by_lane.get((model, p), ()))
                held = sched.lane_of(p)
                queued = sched.queued_rows(held) if held == p else 0
                paused_g, backlog_g, lag_g = gauges[(model, p)]
                paused_g.set(1 if is_paused else 0)
                backlog_g.set(backlog[p] + queued)
                # Age of the oldest waiting record: known for those held here; for a
                # backlog in Kafka, counted from when it was first seen.
                key = (model, p)
                if backlog[p] > 0:
                    self._backlog_since.setdefault(key, now)
                else:
                    self._backlog_since.pop(key, None)
                oldest = sched.oldest_ts(held) if held == p else None
                since = self._backlog_since.get(key)
                ages = [now - t for t in (oldest, since) if t is not None]
                lag_g.set(max(ages) if ages else 0.0)
            self._inflight_gauges[model].set(sched.inflight_rows)
        consumer.set_paused(wanted)

    def fetch_wait_ms(self) -> int:
        """The broker's longest wait for the next fetch (asked as each is built).

        While every executor of every served model computes, the fetch may wait
        until the first of them is expected to finish (up to
        ``busy_fetch_max_wait_ms``), and it comes back in time to join the next
        batch. Polling at ``fetch_max_wait_ms`` instead costs this process and the
        broker CPU that the executors could use. With an executor free and no
        record for ``idle_after_ms``, the wait is :attr:`idle_wait_ms`'s (the
        settings' ``idle_fetch_max_wait_ms``): an idle worker polling a hundred
        times a second costs a batch job beside it as much CPU.
        """
        s = self.settings
        wait_ms = busy_fetch_wait_ms(
            (sched.busy_for_s() for sched in self.schedulers.values()),
            s.fetch_max_wait_ms, s.busy_fetch_max_wait_ms,
        )
        if wait_ms == s.fetch_max_wait_ms and self.idle_wait_ms is not None:
            wait_ms = max(wait_ms, self.idle_wait_ms())
        # The records a fetch brings are handed over after the next one is built: the
        # allowance covers both, beyond the ordinary wait every hop has.
        allowance_s = (max(wait_ms, self._last_fetch_wait_ms) - s.fetch_max_wait_ms) / 1000
        self._last_fetch_wait_ms = wait_ms
        for sched in self.schedulers.values():
            sched.fetch_wait_s = allowance_s
        return wait_ms
