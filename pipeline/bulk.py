"""How bulk (batch-lane) work yields to interactive traffic on a worker.

While interactive requests flow, each model's bulk batches are spaced out so that
they take at most ``share`` of the CPU they are measured to cost (their run and
answers, plus the intake of the batch-lane records since the previous one), and
never come closer than ``interval_ms``: each bulk row also costs the job's client
and the broker, which this process cannot measure. With no interactive traffic
there is no pause. And batch-lane records are taken in chunks of about a fixed
event-loop time (:class:`IntakeSizer`), since an interactive record fetched
meanwhile waits for the chunk's intake. Plain bookkeeping, no I/O: the worker asks
and reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Longest pause between two bulk batches while interactive traffic flows.
MAX_PAUSE_S = 1.0


class BulkThrottle:
    """Per-model pauses between bulk batches; see the module docstring."""

    def __init__(
        self,
        *,
        share: float,
        interval_ms: float,
        max_pause_s: float = MAX_PAUSE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``share`` in (0, 1]; 1 with ``interval_ms`` 0 turns the throttle off."""
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        if interval_ms < 0:
            raise ValueError(f"interval_ms must be at least 0, got {interval_ms}")
        self.share = share
        self.interval_s = interval_ms / 1000
        self.max_pause_s = max_pause_s
        self.clock = clock
        self.enabled = share < 1 or interval_ms > 0
        self._intake_s: dict[str, float] = {}
        self._not_before: dict[str, float] = {}

    def intake(self, model: str, cpu_s: float) -> None:
        """CPU spent taking in a chunk of the model's batch-lane records."""
        if self.enabled:
            self._intake_s[model] = self._intake_s.get(model, 0.0) + cpu_s

    def pause_left_s(self, model: str) -> float:
        """How long the model's next bulk batch must still wait (0: it may run)."""
        return max(self._not_before.get(model, 0.0) - self.clock(), 0.0)

    def ran(self, model: str, cpu_s: float, *, interactive_active: bool) -> float:
        """A bulk batch of ``model`` ran, costing ``cpu_s``; returns the pause set.

        The intake counted since the previous bulk batch is added and reset; the
        interactive work done meanwhile is not counted, or every pause would
        lengthen the next.
        """
        used_s = cpu_s + self._intake_s.pop(model, 0.0)
        if not self.enabled or not interactive_active:
            return 0.0
        pause_s = max(min(used_s * (1 / self.share - 1), self.max_pause_s), self.interval_s)
        self._not_before[model] = self.clock() + pause_s
        return pause_s


class IntakeSizer:
    """How many batch-lane records to take at once for about ``target_s`` of intake.

    A record's intake (parse, validation, decoding) grows with the rows it packs
    (:mod:`pipeline.batchjob` sends up to 16 at a time), so a fixed count of records
    would block the event loop for anywhere from a fraction of a millisecond to
    many. The cost per record is a moving average of what chunks measured.
    """

    def __init__(self, *, target_s: float, most: int, weight: float = 0.2) -> None:
        """``most`` caps the count whatever the measure; ``weight`` is a new chunk's."""
        if target_s <= 0 or most < 1 or not 0 < weight <= 1:
            raise ValueError(f"target_s > 0, most >= 1 and 0 < weight <= 1, got "
                             f"{target_s}, {most}, {weight}")
        self.target_s = target_s
        self.most = most
        self.weight = weight
        self.record_s: float | None = None

    @property
    def records(self) -> int:
        """Records the next chunk may hold (``most`` until a chunk was measured)."""
        if self.record_s is None:
            return self.most
        return max(1, min(self.most, int(self.target_s / max(self.record_s, 1e-9))))

    def took(self, records: int, seconds: float) -> int:
        """A chunk of ``records`` took ``seconds``; returns the next chunk's count."""
        if records > 0:
            per = seconds / records
            prev = self.record_s
            self.record_s = per if prev is None else prev + self.weight * (per - prev)
        return self.records
