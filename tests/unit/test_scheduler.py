"""Scheduler ordering, pausing, deadlines and admission, with controlled time."""

from __future__ import annotations

import math

import pytest

from pipeline.scheduler import (
    BACKLOG_WAIT_S,
    FIFO_LANE,
    FLOW_MIN_ARRIVALS,
    LATE_HOLD_S,
    LATE_SHARE,
    PRIORITY_HOLD_S,
    RECENT_S,
    ModelScheduler,
    Pending,
    busy_fetch_wait_ms,
)


class Clock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(mode: str = "priority", *, clock: Clock, max_inflight: int = 256,
         fixed_s: float = 0.002, per_row_s: float = 0.0001,
         bulk_throttled: bool = False) -> ModelScheduler:
    s = ModelScheduler(
        "m",
        versions={"1": (8, 0.0), "2": (8, 0.0)},
        slo_p99_ms={"1": 200.0, "2": 200.0},
        max_inflight=max_inflight,
        mode=mode,  # type: ignore[arg-type]
        clock=clock,
        bulk_throttled=bulk_throttled,
    )
    for v in ("1", "2"):
        s.compute[v].fixed_s = fixed_s
        s.compute[v].per_row_s = per_row_s
    return s


def req(s: ModelScheduler, id: str, priority: str, *, clock: Clock, version: str = "1",
        rows: int = 1, timeout_ms: float | None = None, age_s: float = 0.0,
        partition: tuple[str, int] = ("lane", 0)) -> Pending:
    ts = clock() - age_s
    deadline = ts + timeout_ms / 1000 if timeout_ms is not None else None
    return Pending(
        id=id, version=version, priority=priority, rows=rows, ts_s=ts, deadline_s=deadline,
        budget_s=s.budget_for(version, priority, ts, deadline), partition=partition,
    )


def ids(items: list[Pending]) -> list[str]:
    return [p.id for p in items]


def test_highest_lane_first_then_fill_from_lower() -> None:
    clock = Clock()
    s = make(clock=clock)
    for i in range(3):
        assert s.admit(req(s, f"b{i}", "batch", clock=clock)) == "queued"
    for i in range(2):
        assert s.admit(req(s, f"n{i}", "normal", clock=clock)) == "queued"
    assert s.admit(req(s, "h0", "high", clock=clock)) == "queued"
    take = s.next_batch()
    # The high request leads; the spare room of the batch goes to normal, then batch.
    assert ids(take.items) == ["h0", "n0", "n1", "b0", "b1", "b2"]


def test_throttled_bulk_rows_never_ride_in_interactive_batches() -> None:
    clock = Clock()
    s = make(clock=clock, bulk_throttled=True)
    for i in range(3):
        s.admit(req(s, f"b{i}", "batch", clock=clock))
    s.admit(req(s, "n0", "normal", clock=clock))
    s.admit(req(s, "h0", "high", clock=clock))
    # Normal rows still fill the high batch; the batch lane's rows wait for a bulk
    # batch of their own (which the worker throttles).
    assert ids(s.next_batch().items) == ["h0", "n0"]
    assert ids(s.next_batch().items) == ["b0", "b1", "b2"]


def test_throttled_batch_lane_pauses_while_a_batch_is_held_beside_interactive() -> None:
    clock = Clock()
    s = make(clock=clock, bulk_throttled=True)
    for i in range(8):
        s.admit(req(s, f"b{i}", "batch", clock=clock))
    # No interactive traffic: bulk is fetched freely.
    assert s.paused_lanes({}) == set()
    for n in ("n0", "n1"):
        s.admit(req(s, n, "normal", clock=clock))
    assert ids(s.next_batch().items) == ["n0", "n1"]
    # Normal requests flow (two within the second): a held batch is enough.
    assert s.paused_lanes({}) == {"batch"}
    assert ids(s.next_batch().items) == [f"b{i}" for i in range(8)]
    assert s.paused_lanes({}) == set()
    # Without the throttle bulk rows ride along and there is no such pause.
    r = make(clock=clock)
    for i in range(8):
        r.admit(req(r, f"b{i}", "batch", clock=clock))
    for n in ("n0", "n1"):
        r.admit(req(r, n, "normal", clock=clock))
    r.next_batch()
    assert r.paused_lanes({}) == set()


def test_bulk_is_held_back_only_while_interactive_requests_flow() -> None:
    clock = Clock()
    s = make(clock=clock, bulk_throttled=True)
    for i in range(8):
        s.admit(req(s, f"b{i}", "batch", clock=clock))
    # A lone request of a sparse stream: served by the time a hold would help it.
    s.admit(req(s, "n0", "normal", clock=clock))
    assert ids(s.next_batch().items) == ["n0"]
    assert not s.interactive_active()
    assert s.paused_lanes({}) == set()
    # Its follow-up more than RECENT_S later is as lone.
    clock.t += RECENT_S + 0.1
    s.admit(req(s, "n1", "normal", clock=clock))
    s.next_batch()
    assert not s.interactive_active()
    # The next one within RECENT_S: traffic flows, the batch lane is held back...
    clock.t += RECENT_S / 2
    s.admit(req(s, "h0", "high", clock=clock))
    s.next_batch()
    assert s.interactive_active()
    assert s.paused_lanes({}) == {"batch"}
    # ...until RECENT_S after the earlier of the two.
    clock.t += RECENT_S / 2 + 0.01
    assert not s.interactive_active()
    assert s.paused_lanes({}) == set()
    # Bulk requests never count as interactive traffic.
    for i in range(FLOW_MIN_ARRIVALS + 1):
        s.admit(req(s, f"x{i}", "batch", clock=clock))
    assert not s.interactive_active()
    # Nor does anything in fifo mode, which has no bulk throttle to steer.
    f = make("fifo", clock=clock)
    for i in range(FLOW_MIN_ARRIVALS):
        f.admit(req(f, f"n{i}", "normal", clock=clock))
    assert not f.interactive_active()


def test_no_fill_when_it_would_break_the_high_members_budget() -> None:
    clock = Clock()
    # 30 ms per row: a batch of 8 (242 ms) would blow the 200 ms SLO of the high request.
    s = make(clock=clock, fixed_s=0.002, per_row_s=0.03)
    for i in range(8):
        s.admit(req(s, f"b{i}", "batch", clock=clock))
    s.admit(req(s, "h0", "high", clock=clock))
    take = s.next_batch()
    assert ids(take.items)[0] == "h0"
    # h0 plus what a quarter of the SLO affords (less than half its remaining budget).
    assert len(take.items) == int((0.2 * 0.25 - 0.002) / 0.03)


def test_fifo_mode_serves_in_arrival_order() -> None:
    clock = Clock()
    s = make("fifo", clock=clock)
    for i, p in enumerate(["batch", "batch", "normal", "high"]):
        s.admit(req(s, f"r{i}", p, clock=clock))
        clock.t += 0.001
    assert s.lanes == (FIFO_LANE,)
    assert ids(s.next_batch().items) == ["r0", "r1", "r2", "r3"]


def test_versions_are_batched_apart_oldest_first() -> None:
    clock = Clock()
    s = make(clock=clock)
    s.admit(req(s, "a", "normal", clock=clock, version="2"))
    clock.t += 0.001
    s.admit(req(s, "b", "normal", clock=clock, version="1"))
    s.admit(req(s, "c", "normal", clock=clock, version="2"))
    first = s.next_batch()
    assert (first.version, ids(first.items)) == ("2", ["a", "c"])
    second = s.next_batch()
    assert (second.version, ids(second.items)) == ("1", ["b"])


def test_pause_lower_lanes_while_higher_has_backlog() -> None:
    clock = Clock()
    s = make(clock=clock)
    assert s.paused_lanes({}) == set()
    # Backlog of the high lane still in Kafka pauses normal and batch.
    assert s.paused_lanes({"high": 5}) == {"normal", "batch"}
    # They stay paused a while (no flapping as a steady lane empties and refills).
    assert s.paused_lanes({}) == {"normal", "batch"}
    clock.t += PRIORITY_HOLD_S
    assert s.paused_lanes({}) == set()
    # A normal backlog pauses only batch.
    assert s.paused_lanes({"normal": 1}) == {"batch"}
    clock.t += PRIORITY_HOLD_S
    # Held here: more than the next batch takes is a backlog at once ...
    for i in range(9):
        s.admit(req(s, f"h{i}", "high", clock=clock))
    assert s.paused_lanes({}) == {"normal", "batch"}
    while s.queued_rows("high"):
        s.next_batch()
    clock.t += PRIORITY_HOLD_S
    assert s.paused_lanes({}) == set()
    # ... and so is a request held longer than BACKLOG_WAIT_S; a fresh one is not.
    s.admit(req(s, "fresh", "high", clock=clock))
    assert s.paused_lanes({}) == set()
    clock.t += BACKLOG_WAIT_S * 2
    assert s.paused_lanes({}) == {"normal", "batch"}


def test_late_high_arrivals_pause_lower_lanes() -> None:
    clock = Clock()
    s = make(clock=clock)
    # Arriving with a fifth of the 200 ms SLO spent upstream: the path is congested.
    s.admit(req(s, "on-time", "high", clock=clock, age_s=0.01))
    s.next_batch()
    assert s.paused_lanes({}) == set()
    s.admit(req(s, "late", "high", clock=clock, age_s=LATE_SHARE * 0.2 + 0.005))
    s.next_batch()
    assert s.paused_lanes({}) == {"normal", "batch"}
    clock.t += LATE_HOLD_S
    assert s.paused_lanes({}) == set()
    # Late normal or batch requests do not pause anything.
    s.admit(req(s, "late-normal", "normal", clock=clock, age_s=1.0))
    s.next_batch()
    assert s.paused_lanes({}) == set()


def test_time_parked_in_the_workers_own_fetch_is_not_lateness() -> None:
    clock = Clock()
    s = make(clock=clock)
    # The worker let its fetch wait 150 ms longer than usual (its executors were busy):
    # a high request that spent those 150 ms there was not held up upstream.
    s.fetch_wait_s = 0.15
    s.admit(req(s, "parked", "high", clock=clock, age_s=LATE_SHARE * 0.2 + 0.1))
    s.next_batch()
    assert s.paused_lanes({}) == set()
    # Late beyond that allowance, it is.
    s.admit(req(s, "late", "high", clock=clock, age_s=LATE_SHARE * 0.2 + 0.155))
    s.next_batch()
    assert s.paused_lanes({}) == {"normal", "batch"}


def test_busy_for_is_the_time_until_the_first_executor_frees() -> None:
    clock = Clock()
    two = make(clock=clock, fixed_s=0.01, per_row_s=0.01)
    two.executors = 2
    one = make(clock=clock, fixed_s=0.01, per_row_s=0.01)
    # One of two executors computes: a request arriving now could start now.
    for s in (two, one):
        s.started("1", 4)  # predicted 50 ms
    assert two.busy_for_s() == 0.0
    assert one.busy_for_s() == pytest.approx(0.05)
    clock.t += 0.02
    two.started("1", 8)  # predicted 90 ms, until t+110 ms
    assert two.busy_for_s() == pytest.approx(0.03)
    # The first finishes: one executor is free again.
    two.finished("1", 4, 0.05)
    assert two.busy_for_s() == 0.0
    two.executors = 1
    assert two.busy_for_s() == pytest.approx(0.09)
    # Overdue (slower than predicted): no longer counted as busy.
    clock.t += 0.2
    assert two.busy_for_s() == 0.0
    two.finished("1", 8, 0.2)
    assert two.busy_for_s() == 0.0


def test_busy_fetch_wait_follows_the_soonest_free_model() -> None:
    # Ordinary wait while any model has a free executor (busy for 0 s) or none is served.
    assert busy_fetch_wait_ms([0.0, 0.3], 10, 200) == 10
    assert busy_fetch_wait_ms([], 10, 200) == 10
    # All busy: wait until the soonest frees, between the ordinary wait and the cap.
    assert busy_fetch_wait_ms([0.12, 0.3], 10, 200) == 120
    assert busy_fetch_wait_ms([0.004], 10, 200) == 10
    # Short batches (a fast model) keep the ordinary wait: under five of them away.
    assert busy_fetch_wait_ms([0.049], 10, 200) == 10
    assert busy_fetch_wait_ms([0.05], 10, 200) == 50
    assert busy_fetch_wait_ms([2.0], 10, 200) == 200
    # A cap of 0 turns it off.
    assert busy_fetch_wait_ms([2.0], 10, 0) == 10


def test_a_full_lane_pauses_itself() -> None:
    clock = Clock()
    s = make(clock=clock, max_inflight=4)
    for i in range(4):
        s.admit(req(s, f"b{i}", "batch", clock=clock))
    assert s.paused_lanes({}) == {"batch"}
    # It stays paused until half drained, so the lane does not flap at the bound.
    s.policy["1"].max_batch_size = 1
    s.next_batch()
    assert s.paused_lanes({}) == {"batch"}
    s.next_batch()
    assert s.paused_lanes({}) == set()
    f = make("fifo", clock=clock, max_inflight=4)
    for i in range(4):
        f.admit(req(f, f"r{i}", "high", clock=clock))
    assert f.paused_lanes({}) == {"high", "normal", "batch"}


def test_the_high_lane_is_bounded_by_rejecting_not_pausing() -> None:
    clock = Clock()
    s = make(clock=clock, max_inflight=4)
    for i in range(4):
        assert s.admit(req(s, f"h{i}", "high", clock=clock)) == "queued"
    # Paused, the lane would leave high requests unseen in Kafka, answered late.
    assert "high" not in s.paused_lanes({})
    # Past the bound a high request is answered at once instead, deadline or not.
    assert s.admit(req(s, "h4", "high", clock=clock)) == "rejected"
    assert s.admit(req(s, "h5", "high", clock=clock, timeout_ms=60_000)) == "rejected"
    assert s.queued_rows("high") == 4
    # Lower lanes still wait in Kafka at the bound.
    for i in range(4):
        s.admit(req(s, f"n{i}", "normal", clock=clock))
    assert "normal" in s.paused_lanes({})


def test_expired_on_arrival() -> None:
    clock = Clock()
    s = make(clock=clock)
    assert s.admit(req(s, "late", "normal", clock=clock, timeout_ms=50, age_s=0.06)) == "expired"
    assert s.queued_rows("normal") == 0


def test_expires_while_waiting_without_computing() -> None:
    clock = Clock()
    s = make(clock=clock)
    s.admit(req(s, "x", "normal", clock=clock, timeout_ms=100))
    s.admit(req(s, "y", "normal", clock=clock))
    clock.t += 0.099  # 1 ms left, a batch of one takes 2.1 ms: it cannot make it
    take = s.next_batch()
    assert ids(take.expired) == ["x"]
    assert ids(take.items) == ["y"]


def test_high_priority_rejected_when_it_cannot_make_it_even_if_next() -> None:
    clock = Clock()
    s = make(clock=clock, fixed_s=0.010, per_row_s=0.001)  # 18 ms per batch of 8
    for i in range(40):
        s.admit(req(s, f"h{i}", "high", clock=clock))
    # 40 high rows ahead = 5 batches = 90 ms, then its own: 100+ ms > 50 ms deadline.
    assert s.admit(req(s, "late", "high", clock=clock, timeout_ms=50)) == "rejected"
    # A lenient deadline is admitted; so is a normal request (it waits, or expires later).
    assert s.admit(req(s, "ok", "high", clock=clock, timeout_ms=500)) == "queued"
    assert s.admit(req(s, "n", "normal", clock=clock, timeout_ms=50)) == "queued"


def test_running_batch_counts_for_admission() -> None:
    clock = Clock()
    s = make(clock=clock, fixed_s=0.040, per_row_s=0.0)
    assert s.predict_done_if_next(req(s, "a", "high", clock=clock), clock()) == pytest.approx(
        clock() + 0.040
    )
    s.started("1", 8)
    assert s.predict_done_if_next(req(s, "a", "high", clock=clock), clock()) == pytest.approx(
        clock() + 0.080
    )
    s.finished("1", 8, 0.040)
    assert s.running_rows == 0


def test_fifo_mode_never_rejects() -> None:
    clock = Clock()
    s = make("fifo", clock=clock, fixed_s=0.010, per_row_s=0.001)
    for i in range(40):
        s.admit(req(s, f"h{i}", "high", clock=clock))
    assert s.admit(req(s, "late", "high", clock=clock, timeout_ms=50)) == "queued"


def test_budget_is_deadline_or_slo_whichever_first() -> None:
    clock = Clock()
    s = make(clock=clock)
    assert s.budget_for("1", "normal", 10.0, None) == pytest.approx(10.2)
    assert s.budget_for("1", "high", 10.0, 10.05) == pytest.approx(10.05)
    assert s.budget_for("1", "batch", 10.0, None) == math.inf
    assert s.budget_for("1", "batch", 10.0, 70.0) == 70.0


def test_waits_for_more_rows_when_they_arrive_fast() -> None:
    clock = Clock()
    s = make(clock=clock)
    s.policy["1"].max_wait_s = 0.005
    for _ in range(20_000):
        s.admit(req(s, "warm", "batch", clock=clock))
        clock.t += 0.0001
        s.next_batch()  # keep the lane short: we only want the arrival rate
    s.admit(req(s, "a", "batch", clock=clock))
    take = s.next_batch()
    assert take.items == [] and 0 < take.wait_s <= 0.005


def test_drop_revoked_partitions() -> None:
    clock = Clock()
    s = make(clock=clock)
    s.admit(req(s, "a", "normal", clock=clock, partition=("lane", 0)))
    s.admit(req(s, "b", "normal", clock=clock, partition=("lane", 1)))
    s.admit(req(s, "c", "batch", clock=clock, partition=("lane", 1)))
    dropped = s.drop({("lane", 1)})
    assert sorted(ids(dropped)) == ["b", "c"]
    assert s.queued_rows("normal") == 1 and s.queued_rows("batch") == 0
    assert ids(s.next_batch().items) == ["a"]


def test_inflight_counts_queued_and_running_rows() -> None:
    clock = Clock()
    s = make(clock=clock)
    s.admit(req(s, "a", "normal", clock=clock, rows=3))
    s.admit(req(s, "b", "batch", clock=clock, rows=2))
    assert s.inflight_rows == 5
    take = s.next_batch()
    s.started(take.version, 5)
    assert s.inflight_rows == 5
    s.finished(take.version, 5, 0.003)
    assert s.inflight_rows == 0
    assert s.oldest_ts("normal") is None


def test_lower_lane_batches_stay_short_while_high_requests_come() -> None:
    clock = Clock()
    # 10 ms per row: a full batch of 8 takes 82 ms; a quarter of the 200 ms SLO is 50 ms.
    s = make(clock=clock, fixed_s=0.002, per_row_s=0.010)
    for i in range(8):
        s.admit(req(s, f"n{i}", "normal", clock=clock))
    assert len(s.next_batch().items) == 8  # no high traffic: the full batch
    for i in range(20):
        s.admit(req(s, f"m{i}", "normal", clock=clock))
    s.admit(req(s, "h", "high", clock=clock))
    assert ids(s.next_batch().items)[0] == "h"
    take = s.next_batch()  # the high one just came: keep the normal batch short
    assert len(take.items) == int((0.2 * 0.25 - 0.002) / 0.010)
    clock.t += 2.0  # no high request for a while: full batches again
    s.drop({("lane", 0)})
    for i in range(8):
        s.admit(req(s, f"k{i}", "normal", clock=clock))
    assert len(s.next_batch().items) == 8


def test_several_batches_running_at_once_are_all_accounted() -> None:
    clock = Clock()
    s = make(clock=clock)
    s.started("1", 8)
    s.started("1", 5)
    assert s.running_rows == 13
    # Predictions of when a high request would be done wait for the longest of them.
    s.finished("1", 8, 0.003, started_rows=8)
    assert s.running_rows == 5
    s.finished("1", 0, 0.0, started_rows=5)  # a failed batch teaches nothing
    assert s.running_rows == 0
    assert s.inflight_rows == 0


def test_bulk_batches_stay_short_while_interactive_requests_come() -> None:
    clock = Clock()
    # 10 ms per row: a full batch of 8 takes 82 ms; a quarter of the 200 ms SLO is 50 ms.
    s = make(clock=clock, fixed_s=0.002, per_row_s=0.010, bulk_throttled=True)
    for i in range(16):
        s.admit(req(s, f"b{i}", "batch", clock=clock))
    assert len(s.next_batch().items) == 8  # idle time: the full batch
    s.admit(req(s, "n", "normal", clock=clock))
    assert ids(s.next_batch().items) == ["n"]
    # A normal request just came (no high one): the bulk batch is kept short too.
    assert len(s.next_batch().items) == int((0.2 * 0.25 - 0.002) / 0.010)
    clock.t += 2.0  # interactive traffic stopped: full bulk batches again
    for i in range(8):
        s.admit(req(s, f"c{i}", "batch", clock=clock))
    assert len(s.next_batch().items) == 8


def test_everything_queued_is_shared_between_idle_executors() -> None:
    clock = Clock()
    # 10 ms per row: 6 rows take 62 ms on one executor.
    s = make(clock=clock, fixed_s=0.002, per_row_s=0.010)
    s.executors = 2
    for i in range(6):
        s.admit(req(s, f"b{i}", "batch", clock=clock))
    s.changed.clear()
    first = s.next_batch().items
    assert ids(first) == ["b0", "b1", "b2"]
    assert s.changed.is_set()  # the other idle executor is told to take the rest
    s.started("1", 3)
    # One executor now computes: the rest is one batch, not shared again.
    assert ids(s.next_batch().items) == ["b3", "b4", "b5"]


def test_no_sharing_when_more_is_queued_or_executors_are_busy_or_the_batch_is_quick() -> None:
    clock = Clock()
    s = make(clock=clock, fixed_s=0.002, per_row_s=0.010)
    s.executors = 2
    for i in range(12):
        s.admit(req(s, f"b{i}", "batch", clock=clock))
    # More than a batch queued: the other executor gets the next full batch anyway.
    assert len(s.next_batch().items) == 8
    s.started("1", 8)
    s.started("1", 8)
    # Both executors compute (none idle): the rest stays one batch.
    assert len(s.next_batch().items) == 4
    quick = make(clock=clock, fixed_s=0.002, per_row_s=0.0001)
    quick.executors = 2
    for i in range(6):
        quick.admit(req(quick, f"q{i}", "batch", clock=clock))
    # 2.6 ms of compute: sharing it would save less than it costs.
    assert len(quick.next_batch().items) == 6


def test_packed_requests_are_shared_whole() -> None:
    clock = Clock()
    s = make(clock=clock, fixed_s=0.002, per_row_s=0.010)
    s.executors = 3
    s.admit(req(s, "p0", "batch", clock=clock, rows=4))
    s.admit(req(s, "p1", "batch", clock=clock, rows=4))
    # 8 rows over 3 idle executors is 3 rows each, but a request is never cut.
    assert ids(s.next_batch().items) == ["p0"]
    assert ids(s.next_batch().items) == ["p1"]
