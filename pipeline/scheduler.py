"""SLO-first scheduling of one model's requests inside a worker.

Requests taken from a model's lanes wait here, one FIFO per priority and
version, until the model's executor takes a batch. The rules:

- Priority: a batch is always formed from the highest non-empty lane; spare
  room in it is filled from lower lanes of the same version only when the
  batch's own members can afford the extra rows. Lower lanes are *paused* (their
  records stay in Kafka) while a higher lane has backlog (records in Kafka, more
  held here than the next batch takes, or one held past ``BACKLOG_WAIT_S``), and
  for ``PRIORITY_HOLD_S`` after; also for ``LATE_HOLD_S`` after a high request
  arrives with ``LATE_SHARE`` of its SLO already spent upstream, since then the
  CPU a lower lane's intake takes is what the high lane's path lacks. A lower
  lane is also paused when it holds ``max_inflight`` rows here; the high lane
  is not (its requests would wait unseen in Kafka) but rejects past that bound,
  so memory stays bounded whatever the offered load.
- Bulk: when the worker throttles bulk work (``bulk_throttled``), rows
  of the batch lane run only in batches of their own, never filling interactive
  ones, and while interactive traffic flows (``FLOW_MIN_ARRIVALS`` requests within
  ``RECENT_S``) the batch lane pauses once a batch of it is held.
- Guard: while requests of a higher lane arrive, a batch of a lower one takes at
  most ``GUARD_SHARE`` of the SLO's worth of rows, since such a request arriving
  meanwhile waits for it; a bulk batch in idle time runs at the model's full
  ``max_batch_size``.
- Deadlines: ``timeout_ms`` counts from the record's timestamp. A request past
  its deadline, or that would be once computed, is answered ``expired`` without
  computing.
- Admission: a high-priority request that cannot meet its deadline even if it
  were served next (the batch running now, the high-priority rows ahead of it,
  then its own batch), or that would take the high lane past ``max_inflight``,
  is answered ``rejected`` at once rather than late.
- Batch size and waiting come from :class:`pipeline.adaptive.BatchPolicy`,
  which learns the model's compute time per batch size.

``fifo`` mode is the single-lane baseline: one queue in arrival order, no
pausing for priority and no admission control.

Everything here is plain Python with the clock passed in (epoch seconds,
comparable with Kafka record timestamps), so the arithmetic is unit-tested
with controlled time.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.adaptive import ArrivalRate, BatchPolicy, ComputeModel, Decision
from pipeline.topics import PRIORITIES

Mode = Literal["priority", "fifo"]
FIFO_LANE = "fifo"
# A lane whose last rows arrived this recently counts as having traffic.
RECENT_S = 1.0
# Interactive traffic flows, and bulk work is held back for it (the worker's pauses
# between bulk batches, the batch lane's pause), once this many high or normal
# requests arrived within RECENT_S. A lone request is served by the time holding
# back would help it, and only a follow-up within RECENT_S gains: holding a job back
# for a second after each request of a sparse stream (one every 2.3 s) took a third
# of the job's rate for that.
FLOW_MIN_ARRIVALS = 2
# While requests of a higher lane keep arriving, a batch of a lower one may take at
# most this share of the model's SLO, since such a request arriving meanwhile waits
# for it.
GUARD_SHARE = 0.25
# How long a lower lane stays paused after a higher lane last had backlog.
PRIORITY_HOLD_S = 0.05
# A higher lane whose oldest held request has waited this long is not being kept up with.
BACKLOG_WAIT_S = 0.01
# A high request reaching the worker with this share of its SLO spent arrived late.
LATE_SHARE = 0.2
# How long lower lanes stay paused after a high request arrived late (see admit).
LATE_HOLD_S = 0.5
# A busy worker's fetch waits longer only when its executors free this many ordinary
# fetch waits away or more (see busy_fetch_wait_ms).
BUSY_FETCH_MIN_WAITS = 5
# A batch predicted to take at least this long on one executor is shared with the
# model's idle executors when it holds everything queued (see next_batch).
SHARE_MIN_S = 0.02


@dataclass(slots=True)
class Pending:
    """A validated request waiting in a worker for its batch."""

    id: str
    version: str
    priority: str
    rows: int
    ts_s: float
    """Record timestamp, epoch seconds: deadlines and latency count from it."""
    deadline_s: float | None
    """Absolute deadline, epoch seconds, or None without ``timeout_ms``."""
    budget_s: float
    """When the request should be answered by: its deadline, or sooner its SLO."""
    partition: tuple[str, int] = ("", 0)
    payload: Any = None
    """What the worker needs to run and answer it (inputs, record, request)."""
    arrived_s: float = 0.0


@dataclass(slots=True)
class Take:
    """What the executor should do next.

    ``items`` to run as one batch of ``version``, and/or ``expired`` to answer
    without computing; when both are empty, look again after ``wait_s``.
    """

    version: str = ""
    items: list[Pending] = field(default_factory=list)
    expired: list[Pending] = field(default_factory=list)
    wait_s: float = 0.0


class ModelScheduler:
    """Queues, pausing decisions and batch formation for one model."""

    def __init__(
        self,
        model: str,
        *,
        versions: dict[str, tuple[int, float]],
        slo_p99_ms: dict[str, float],
        max_inflight: int,
        mode: Mode = "priority",
        clock: Callable[[], float] | None = None,
        bulk_throttled: bool = False,
    ) -> None:
        """``versions`` maps each version to (max_batch_size, max_wait_ms).

        With ``bulk_throttled``, batch-lane rows never fill the spare room of
        an interactive batch: they run only in bulk batches, which the worker spaces
        out (:mod:`pipeline.bulk`); and while interactive traffic flows the batch lane
        is paused once a batch of it is held.
        """
        import time

        self.model = model
        self.mode: Mode = mode
        self.bulk_throttled = bulk_throttled
        self.max_inflight = max_inflight
        self.clock = clock or time.time
        self.slo_s = {v: ms / 1000 for v, ms in slo_p99_ms.items()}
        self.compute = {v: ComputeModel() for v in versions}
        self.policy = {
            v: BatchPolicy(self.compute[v], max_batch_size=size, max_wait_ms=wait)
            for v, (size, wait) in versions.items()
        }
        self.lanes: tuple[str, ...] = PRIORITIES if mode == "priority" else (FIFO_LANE,)
        self._queues: dict[str, dict[str, deque[Pending]]] = {
            lane: {v: deque() for v in versions} for lane in self.lanes
        }
        self._rows: dict[str, int] = dict.fromkeys(self.lanes, 0)
        self.arrivals = {lane: ArrivalRate() for lane in self.lanes}
        # When the latest interactive requests arrived (see interactive_active).
        self._interactive_at: deque[float] = deque(maxlen=FLOW_MIN_ARRIVALS)
        self._full: set[str] = set()
        self._held_until: dict[str, float] = {}
        self._late_until = 0.0
        # How much longer than usual the worker's own fetch may have parked a record
        # (see busy_for_s): time spent there is not congestion upstream.
        self.fetch_wait_s = 0.0
        self._batch_rows = max(size for size, _ in versions.values())
        self.running_rows = 0
        # Predicted end of each running batch (epoch seconds).
        self._ends: list[float] = []
        # Executors taking batches of this model (the worker's instances of it).
        self.executors = 1
        self.changed = asyncio.Event()
        # Set when an interactive (high or normal) request is queued: cuts a bulk pause short.
        self.interactive = asyncio.Event()

    # -- queueing ---------------------------------------------------------------

    def lane_of(self, priority: str) -> str:
        """The lane a request of ``priority`` waits in."""
        return priority if self.mode == "priority" else FIFO_LANE

    def budget_for(
        self, version: str, priority: str, ts_s: float, deadline_s: float | None
    ) -> float:
        """When a request should be answered by: deadline, or its SLO if sooner.

        The bulk lane has no SLO: only its deadline, if any, bounds it.
        """
        budget = deadline_s if deadline_s is not None else math.inf
        if priority != "batch":
            budget = min(budget, ts_s + self.slo_s.get(version, 0.2))
        return budget

    def admit(self, item: Pending) -> Literal["queued", "expired", "rejected"]:
        """Queue ``item``, or say why it is answered at once."""
        now = self.clock()
        if item.deadline_s is not None and now >= item.deadline_s:
            return "expired"
        lane = self.lane_of(item.priority)
        if self.mode == "priority" and item.priority == "high":
            # The high lane is never paused: a high request waiting unseen in Kafka
            # would be answered late instead of at once. It is bounded here instead.
            if self._rows[lane] + item.rows > self.max_inflight:
                return "rejected"
            if (
                item.deadline_s is not None
                and self.predict_done_if_next(item, now) > item.deadline_s
            ):
                return "rejected"
            slo_s = self.slo_s.get(item.version)
            if (slo_s is not None
                    and now - item.ts_s - self.fetch_wait_s > LATE_SHARE * slo_s):
                # High requests reach this worker late: the pipeline upstream (broker,
                # routers, this process) is congested. Lower lanes wait in Kafka for a
                # while, so that the CPU they would take goes to the high lane's path.
                self._late_until = now + LATE_HOLD_S
        item.arrived_s = now
        self._queues[lane][item.version].append(item)
        self._rows[lane] += item.rows
        self.arrivals[lane].add(item.rows, now)
        self.changed.set()
        if item.priority != "batch":
            self.interactive.set()
            if self.mode == "priority":
                self._interactive_at.append(now)
        return "queued"

    def predict_done_if_next(self, item: Pending, now: float) -> float:
        """When ``item`` would be answered if served before any lower lane."""
        model = self.compute[item.version]
        limit = self.policy[item.version].max_batch_size
        # The running batches end by the last predicted end (0 when none runs).
        t = max(max(self._ends, default=0.0), now)
        ahead = self._rows[self.lane_of(item.priority)]
        rows = ahead + item.rows
        while rows > limit:
            t += model.predict(limit)
            rows -= limit
        return t + model.predict(rows)

    def queued_rows(self, lane: str) -> int:
        """Rows waiting in ``lane``."""
        return self._rows[lane]

    @property
    def inflight_rows(self) -> int:
        """Rows queued here plus the batch being computed."""
        return sum(self._rows.values()) + self.running_rows

    def _waited_s(self, lane: str, now: float) -> float:
        """How long the longest-waiting request held in ``lane`` has been here."""
        heads = [q[0].arrived_s for q in self._queues[lane].values() if q]
        return now - min(heads) if heads else 0.0

    def oldest_ts(self, lane: str) -> float | None:
        """Record timestamp of the oldest request waiting in ``lane``."""
        heads = [q[0].ts_s for q in self._queues[lane].values() if q]
        return min(heads) if heads else None

    def items(self) -> Iterator[Pending]:
        """Every queued request."""
        for lane in self.lanes:
            for q in self._queues[lane].values():
                yield from q

    def drop(self, partitions: Iterable[tuple[str, int]]) -> list[Pending]:
        """Remove and return the queued requests read from ``partitions`` (revoked)."""
        gone = set(partitions)
        dropped: list[Pending] = []
        for lane in self.lanes:
            for version, q in self._queues[lane].items():
                keep = deque(p for p in q if p.partition not in gone)
                if len(keep) != len(q):
                    dropped.extend(p for p in q if p.partition in gone)
                    self._queues[lane][version] = keep
                    self._rows[lane] = sum(p.rows for qq in self._queues[lane].values() for p in qq)
        return dropped

    # -- pausing ----------------------------------------------------------------

    def paused_lanes(self, kafka_backlog: dict[str, int]) -> set[str]:
        """Priorities whose lane topics should not be fetched now.

        ``kafka_backlog`` maps a priority to the records of the model's lane still
        in Kafka. In priority mode a lane pauses while any higher lane has
        backlog here or in Kafka; a lower lane pauses when it holds
        ``max_inflight`` rows here (the high lane never pauses: over that bound
        its requests are rejected at admission). In fifo mode all lanes share
        one bound and pause together.
        """
        paused: set[str] = set()
        lanes = (FIFO_LANE,) if self.mode == "fifo" else PRIORITIES
        for lane in lanes:
            # Hysteresis: a full lane resumes only once half drained. Pausing drops the
            # Kafka client's prefetched records of the lane, to be fetched again, so
            # flapping at the bound would make the broker serve every record twice.
            if self._rows[lane] >= self.max_inflight:
                self._full.add(lane)
            elif self._rows[lane] <= self.max_inflight // 2:
                self._full.discard(lane)
        if self.mode == "fifo":
            if FIFO_LANE in self._full:
                paused.update(PRIORITIES)
            return paused
        higher_busy = False
        now = self.clock()
        for p in PRIORITIES:
            if higher_busy:
                # Held a while once paused: under steady high traffic the higher lane
                # empties and refills many times a second, and each resume re-fetches
                # (pausing drops the client's prefetched records).
                self._held_until[p] = now + PRIORITY_HOLD_S
            if (
                higher_busy
                or now < self._held_until.get(p, 0.0)
                or (p in self._full and p != PRIORITIES[0])
                or (p == "batch" and self.bulk_throttled
                    and self._rows[p] >= self._batch_rows and self.interactive_active())
            ):
                paused.add(p)
            # Backlog: records still in Kafka, or more held here than the next batch
            # takes. A steady stream that is kept up with leaves room for lower lanes.
            if (
                kafka_backlog.get(p, 0) > 0
                or (p == PRIORITIES[0] and now < self._late_until)
                or self._rows[p] > self._batch_rows
                or (self._rows[p] > 0 and self._waited_s(p, now) > BACKLOG_WAIT_S)
            ):
                higher_busy = True
        return paused

    # -- batch formation ----------------------------------------------------------

    def next_batch(self) -> Take:
        """The next batch to run, the requests to answer ``expired``, or how long to wait."""
        now = self.clock()
        expired: list[Pending] = []
        for li, lane in enumerate(self.lanes):
            if self._rows[lane] == 0:
                continue
            version, q = self._oldest_queue(lane)
            policy = self.policy[version]
            model = self.compute[version]
            # Requests that cannot finish by their deadline are answered, not run.
            one = model.predict(1)
            kept: deque[Pending] = deque()
            while q:
                p = q.popleft()
                if p.deadline_s is not None and now + one > p.deadline_s:
                    expired.append(p)
                    self._rows[lane] -= p.rows
                else:
                    kept.append(p)
            self._queues[lane][version] = q = kept
            if not q:
                if expired:
                    return Take(expired=expired)
                continue
            queued = sum(p.rows for p in q)
            budget = min(p.budget_s for p in _head(q, policy.max_batch_size))
            decision: Decision = policy.decide(
                queued_rows=queued,
                budget_s=budget - now,
                oldest_wait_s=now - q[0].arrived_s,
                arrival_rows_per_s=self.arrivals[lane].current(now),
            )
            if decision.rows == 0:
                return Take(expired=expired, wait_s=decision.wait_s)
            rows = decision.rows
            if li > 0 and self._arrived_within(self.lanes[:li], now):
                # A request of a higher lane arriving now waits for this batch: keep it
                # to a quarter of the SLO while such requests are coming. Bulk batches
                # are otherwise as large as the model allows, which can take longer
                # than the SLO itself.
                guard = model.max_rows_within(self.slo_s.get(version, 0.2) * GUARD_SHARE, rows)
                rows = max(guard, q[0].rows)
            idle = self.executors - len(self._ends)
            shared = (idle > 1 and sum(self._rows.values()) <= rows
                      and model.predict(rows) >= SHARE_MIN_S)
            if shared:
                # Everything queued fits in this batch while other executors sit idle
                # (the tail of a job, or a lull): run it as one part per idle executor,
                # done in about 1/idle of the time, instead of on one core while the
                # others wait for rows that are not there.
                rows = max(-(-rows // idle), q[0].rows)
            items = self._pop(lane, version, rows)
            if shared and self._rows[lane]:
                self.changed.set()  # the idle executors take the other parts
            room = policy.max_batch_size - sum(p.rows for p in items)
            if room > 0 and self.mode == "priority":
                # Fill spare room from lower lanes only with what the members' remaining
                # budget easily affords (half of it: predictions are not exact), and for a
                # high batch no more than a lower batch could take (the guard).
                spare_s = (min(p.budget_s for p in items) - now) * 0.5
                if li == 0:
                    spare_s = min(spare_s, self.slo_s.get(version, 0.2) * GUARD_SHARE)
                afford = model.max_rows_within(spare_s, policy.max_batch_size)
                room = min(room, afford - sum(p.rows for p in items))
                for lower in self.lanes[li + 1:]:
                    if room <= 0:
                        break
                    if lower == "batch" and self.bulk_throttled:
                        # The compute of a ride-along row is nearly free, but its answer,
                        # the bulk producer's next send and the broker's share are not:
                        # at one interactive batch per request, ride-alongs would run
                        # the job at full speed beside interactive traffic.
                        break
                    filled = self._pop(lower, version, room)
                    room -= sum(p.rows for p in filled)
                    items.extend(filled)
            return Take(version=version, items=items, expired=expired)
        return Take(expired=expired, wait_s=1.0)

    def _oldest_queue(self, lane: str) -> tuple[str, deque[Pending]]:
        best: tuple[str, deque[Pending]] | None = None
        for version, q in self._queues[lane].items():
            if q and (best is None or q[0].arrived_s < best[1][0].arrived_s):
                best = (version, q)
        assert best is not None
        return best

    def _pop(self, lane: str, version: str, max_rows: int) -> list[Pending]:
        q = self._queues[lane][version]
        taken: list[Pending] = []
        rows = 0
        while q and rows + q[0].rows <= max_rows:
            p = q.popleft()
            rows += p.rows
            taken.append(p)
        self._rows[lane] -= rows
        return taken

    # -- execution accounting -----------------------------------------------------

    def started(self, version: str, rows: int) -> None:
        """A batch of ``rows`` rows of ``version`` starts computing now (others may run too)."""
        self.running_rows += rows
        self._ends.append(self.clock() + self.compute[version].predict(rows))

    def finished(
        self, version: str, rows: int, compute_s: float, *, started_rows: int | None = None
    ) -> None:
        """A batch finished (``started_rows``, default ``rows``, stop running); teach the
        compute model what ``rows`` cost."""
        done = rows if started_rows is None else started_rows
        self.running_rows = max(self.running_rows - done, 0)
        if self._ends:
            # Batches carry no token: the one expected first is taken as finished,
            # which is right whenever the predictions keep their order.
            self._ends.remove(min(self._ends))
        if rows:
            self.compute[version].observe(rows, compute_s)

    def busy_for_s(self) -> float:
        """Seconds until one of the model's :attr:`executors` is expected to be free.

        0 while fewer batches than executors run, or once the first of them is
        overdue. Until then, a request arriving could not start any sooner than this.
        """
        if self.executors <= 0 or len(self._ends) < self.executors:
            return 0.0
        return max(min(self._ends) - self.clock(), 0.0)

    def only_bulk_queued(self) -> bool:
        """Whether the next batch would be bulk work: only the batch lane holds rows."""
        return (
            self.mode == "priority" and self._rows["batch"] > 0
            and self._rows["high"] == 0 and self._rows["normal"] == 0
        )

    def _arrived_within(self, lanes: tuple[str, ...], now: float,
                        within_s: float = RECENT_S) -> bool:
        """Whether rows arrived in any of ``lanes`` in the last ``within_s`` seconds."""
        for lane in lanes:
            last = self.arrivals[lane].last_s if lane in self.arrivals else None
            if last is not None and now - last <= within_s:
                return True
        return False

    def interactive_active(self) -> bool:
        """Whether interactive traffic flows: ``FLOW_MIN_ARRIVALS`` high or normal
        requests arrived in the last ``RECENT_S`` seconds (never in fifo mode)."""
        at = self._interactive_at
        return len(at) == at.maxlen and self.clock() - at[0] <= RECENT_S

    def seed(self, version: str, timings: Iterable[tuple[int, float]]) -> None:
        """Start the compute model from measured (rows, seconds), e.g. warm-up runs."""
        for rows, seconds in timings:
            self.compute[version].observe(rows, seconds)


def busy_fetch_wait_ms(busy_s: Iterable[float], base_ms: int, cap_ms: int) -> int:
    """The wait for a worker's next fetch, given each served model's :meth:`busy_for_s`.

    A record fetched sooner could start sooner only if some model has a free
    executor now; otherwise the fetch may wait until the first one is expected to
    be free, up to ``cap_ms``. Only for batches long next to ``base_ms`` (the
    ordinary wait), though: a fast model's high lane has budgets of tens of
    milliseconds, and its lateness check (see :meth:`ModelScheduler.admit`) would
    be loosened by the allowance for a saving of a few fetches.
    """
    soonest_ms = int(min(busy_s, default=0.0) * 1000)
    if soonest_ms < BUSY_FETCH_MIN_WAITS * base_ms:
        return base_ms
    return max(base_ms, min(soonest_ms, cap_ms))


def _head(q: deque[Pending], n: int) -> Iterator[Pending]:
    for i, p in enumerate(q):
        if i >= n:
            return
        yield p
