"""Lane steering: the fetch wait follows the executors, and lateness allows for it."""

from __future__ import annotations

import pytest

from agents.runtime import Runtime
from agents.steering import LaneSteering
from pipeline.registry import Registry
from pipeline.scheduler import ModelScheduler
from pipeline.settings import Settings


class Clock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def scheduler(name: str, clock: Clock, per_row_s: float) -> ModelScheduler:
    s = ModelScheduler(name, versions={"1": (64, 0.0)}, slo_p99_ms={"1": 500.0},
                       max_inflight=256, clock=clock)
    s.compute["1"].fixed_s = 0.0
    s.compute["1"].per_row_s = per_row_s
    return s


def steering(tmp_path: pytest.TempPathFactory, **settings: int) -> tuple[LaneSteering, Clock]:
    s = Settings(state_dir=tmp_path, fetch_max_wait_ms=10, **settings)  # type: ignore[arg-type]
    clock = Clock()
    schedulers = {"slow": scheduler("slow", clock, 0.004), "fast": scheduler("fast", clock, 1e-5)}
    steer = LaneSteering(Runtime(s, "127.0.0.1:1", Registry({}, None)), ["slow", "fast"],
                         schedulers)
    schedulers["slow"].executors = 2
    return steer, clock


def test_ordinary_wait_while_any_model_has_a_free_executor(tmp_path: pytest.TempPathFactory
                                                           ) -> None:
    steer, _ = steering(tmp_path)
    slow = steer.schedulers["slow"]
    slow.started("1", 64)
    slow.started("1", 64)
    # "fast" computes nothing: a record for it could start now.
    assert steer.fetch_wait_ms() == 10
    assert slow.fetch_wait_s == 0.0


def test_wait_until_the_first_executor_frees_and_the_allowance(tmp_path: pytest.TempPathFactory
                                                               ) -> None:
    steer, clock = steering(tmp_path, busy_fetch_max_wait_ms=200)
    slow, fast = steer.schedulers["slow"], steer.schedulers["fast"]
    slow.started("1", 64)  # 256 ms
    clock.t += 0.1
    slow.started("1", 32)  # 128 ms: ends first, 228 ms after the first start
    fast.started("1", 64)  # under a millisecond
    assert steer.fetch_wait_ms() == 10
    clock.t += 0.001  # the fast batch is overdue: free again
    fast.finished("1", 64, 0.001)
    assert steer.fetch_wait_ms() == 10
    fast.started("1", 64)
    fast._ends[0] = clock.t + 0.5  # a long one, so only the slow model bounds the wait
    # Every executor computes: wait until the first slow batch is expected to end.
    assert steer.fetch_wait_ms() == 127
    # Records then handed over may have waited that long, beyond the ordinary 10 ms.
    assert slow.fetch_wait_s == pytest.approx(0.117)
    assert fast.fetch_wait_s == pytest.approx(0.117)
    clock.t += 0.127
    slow.finished("1", 32, 0.128)
    assert steer.fetch_wait_ms() == 10
    # The fetch built before still counts: its records come after this one is built.
    assert slow.fetch_wait_s == pytest.approx(0.117)
    assert steer.fetch_wait_ms() == 10
    assert slow.fetch_wait_s == 0.0


def test_the_cap_bounds_the_wait(tmp_path: pytest.TempPathFactory) -> None:
    steer, _ = steering(tmp_path, busy_fetch_max_wait_ms=50)
    for name in ("slow", "slow", "fast"):
        steer.schedulers[name].started("1", 64)
    steer.schedulers["fast"]._ends[0] += 1.0
    assert steer.fetch_wait_ms() == 50


def test_an_idle_worker_fetches_at_the_idle_wait_and_a_busy_one_does_not(
    tmp_path: pytest.TempPathFactory,
) -> None:
    steer, _ = steering(tmp_path, busy_fetch_max_wait_ms=200)
    idle = {"wait_ms": 30}
    steer.idle_wait_ms = lambda: idle["wait_ms"]
    slow = steer.schedulers["slow"]
    # Nothing computes and the consumer has been quiet: its idle wait, allowed for.
    assert steer.fetch_wait_ms() == 30
    assert slow.fetch_wait_s == pytest.approx(0.020)
    # Records came (the consumer's wait is the ordinary one again): so is the fetch's.
    idle["wait_ms"] = 10
    assert steer.fetch_wait_ms() == 10
    assert steer.fetch_wait_ms() == 10
    assert slow.fetch_wait_s == 0.0
    # Every executor busy: the busy wait, whatever the idle one says.
    idle["wait_ms"] = 30
    for name in ("slow", "slow", "fast"):
        steer.schedulers[name].started("1", 64)
    steer.schedulers["fast"]._ends[0] += 1.0
    assert steer.fetch_wait_ms() == 200
