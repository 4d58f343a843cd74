"""Adaptive batching: learn what a batch costs, and size batches to fit the deadlines.

A model's compute time on one execution provider is close to affine in the
batch size, ``t(n) = fixed_s + per_row_s * n``: a fixed cost per call (kernel
launches, the thread hop, allocation) plus a cost per row. :class:`ComputeModel`
fits that line by exponentially weighted least squares over the batches the
worker actually runs, so it follows the machine as it gets busier or quieter,
and starts from the warm-up timings so the first decisions are not blind.

:class:`BatchPolicy` then decides, for the lane at the head of the scheduler,
how many rows to take and whether waiting for more is worth it. Throughput
``n / t(n)`` grows with ``n`` whenever there is a fixed cost, so the policy takes
the largest batch whose members still all finish within their budgets (their
deadline, and for interactive lanes the model's ``slo_p99_ms`` counted from the
record's timestamp). It waits for more rows only when the observed arrival rate
says they will come before the tightest member's budget runs out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Weight kept by past observations at each new one: about the last 50 batches count.
DECAY = 0.98


class ComputeModel:
    """Compute seconds as a function of batch rows, learned from observed batches."""

    def __init__(self, *, fixed_s: float = 0.0005, per_row_s: float = 0.00002) -> None:
        self.fixed_s = fixed_s
        self.per_row_s = per_row_s
        self.observations = 0
        # Exponentially weighted sums for the least-squares line through (rows, seconds).
        self._w = 0.0
        self._sx = 0.0
        self._sy = 0.0
        self._sxx = 0.0
        self._sxy = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        """Account one batch of ``rows`` rows that took ``seconds`` to compute."""
        if rows < 1 or seconds < 0 or not math.isfinite(seconds):
            return
        d = DECAY
        self._w = self._w * d + 1.0
        self._sx = self._sx * d + rows
        self._sy = self._sy * d + seconds
        self._sxx = self._sxx * d + rows * rows
        self._sxy = self._sxy * d + rows * seconds
        self.observations += 1
        self._refit()

    def _refit(self) -> None:
        w = self._w
        mean_x = self._sx / w
        mean_y = self._sy / w
        var_x = self._sxx / w - mean_x * mean_x
        if var_x > 1e-9:
            slope = (self._sxy / w - mean_x * mean_y) / var_x
            self.per_row_s = max(slope, 0.0)
            self.fixed_s = max(mean_y - self.per_row_s * mean_x, 0.0)
        else:
            # One batch size seen so far: keep the slope, move the line through the mean.
            self.fixed_s = max(mean_y - self.per_row_s * mean_x, 0.0)

    def predict(self, rows: int) -> float:
        """Predicted compute seconds of a batch of ``rows`` rows."""
        return self.fixed_s + self.per_row_s * max(rows, 0)

    def max_rows_within(self, seconds: float, limit: int) -> int:
        """The largest batch (at most ``limit``) predicted to compute within ``seconds``."""
        if seconds <= self.fixed_s:
            return 0
        if self.per_row_s <= 0 or math.isinf(seconds):
            return limit
        return max(0, min(limit, int((seconds - self.fixed_s) / self.per_row_s)))


class ArrivalRate:
    """Rows per second arriving in a lane, smoothed over about ``window_s``."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self.rate = 0.0
        self._last: float | None = None

    def add(self, rows: int, now: float) -> None:
        """Count ``rows`` arriving at ``now`` (seconds, any monotonic clock)."""
        if self._last is None:
            self._last = now
            return
        dt = max(now - self._last, 1e-6)
        self._last = now
        alpha = 1.0 - math.exp(-dt / self.window_s)
        self.rate += alpha * (rows / dt - self.rate)

    @property
    def last_s(self) -> float | None:
        """When rows last arrived."""
        return self._last

    def current(self, now: float) -> float:
        """The rate as of ``now``: decays while nothing arrives."""
        if self._last is None:
            return 0.0
        idle = now - self._last
        return self.rate * math.exp(-idle / self.window_s) if idle > 0 else self.rate


@dataclass(frozen=True, slots=True)
class Decision:
    """Take ``rows`` rows now, or (``rows`` == 0) look again after ``wait_s``."""

    rows: int
    wait_s: float = 0.0


class BatchPolicy:
    """Chooses batch size and waiting time for one model version."""

    def __init__(self, model: ComputeModel, *, max_batch_size: int, max_wait_ms: float) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000

    def decide(
        self,
        *,
        queued_rows: int,
        budget_s: float,
        oldest_wait_s: float,
        arrival_rows_per_s: float,
    ) -> Decision:
        """Decide for a lane holding ``queued_rows`` rows.

        ``budget_s`` is the time left before the tightest queued member must be
        answered (its deadline or SLO, whichever is first), ``oldest_wait_s`` how
        long the oldest has waited in this worker, ``arrival_rows_per_s`` the
        lane's recent arrival rate.
        """
        if queued_rows <= 0:
            return Decision(0, self.max_wait_s)
        limit = self.max_batch_size
        if queued_rows >= limit:
            return Decision(limit)
        # Largest batch the tightest member can afford to be computed in.
        affordable = self.model.max_rows_within(budget_s, limit)
        if affordable <= queued_rows:
            # Waiting for more would break a budget (or nothing fits: run at once
            # anyway, the member is answered as late as it is, not later).
            return Decision(queued_rows)
        slack_s = budget_s - self.model.predict(affordable)
        wait_left_s = min(slack_s, self.max_wait_s - oldest_wait_s)
        if wait_left_s <= 0 or arrival_rows_per_s <= 0:
            return Decision(queued_rows)
        fill_s = (affordable - queued_rows) / arrival_rows_per_s
        if fill_s > wait_left_s:
            # More rows would come, but not in time to matter: running now is
            # cheaper than a wait that cannot fill the batch.
            return Decision(queued_rows)
        return Decision(0, max(fill_s, 0.0005))
