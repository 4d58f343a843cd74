"""BulkThrottle: pauses between bulk batches while interactive traffic flows."""

from __future__ import annotations

import pytest

from pipeline.bulk import BulkThrottle


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_pause_leaves_the_bulk_batch_its_share_of_the_cpu() -> None:
    clock = Clock()
    b = BulkThrottle(share=0.1, interval_ms=0, clock=clock)
    # 10 ms of bulk CPU at a 10% share: 90 ms of pause.
    assert b.ran("m", 0.010, interactive_active=True) == pytest.approx(0.090)
    assert b.pause_left_s("m") == pytest.approx(0.090)
    clock.t += 0.05
    assert b.pause_left_s("m") == pytest.approx(0.040)
    clock.t += 0.05
    assert b.pause_left_s("m") == 0.0
    # Other models are not held back.
    assert b.pause_left_s("other") == 0.0


def test_intake_counts_once_toward_the_next_bulk_batch() -> None:
    clock = Clock()
    b = BulkThrottle(share=0.5, interval_ms=0, clock=clock)
    b.intake("m", 0.004)
    b.intake("m", 0.006)
    b.intake("other", 1.0)
    assert b.ran("m", 0.010, interactive_active=True) == pytest.approx(0.020)
    # Reset after use: the next batch pays only for its own.
    assert b.ran("m", 0.010, interactive_active=True) == pytest.approx(0.010)


def test_interval_is_the_floor_and_the_cap_the_ceiling() -> None:
    clock = Clock()
    b = BulkThrottle(share=0.1, interval_ms=250, max_pause_s=1.0, clock=clock)
    assert b.ran("m", 0.001, interactive_active=True) == pytest.approx(0.25)
    assert b.ran("m", 5.0, interactive_active=True) == pytest.approx(1.0)


def test_no_pause_without_interactive_traffic_or_when_disabled() -> None:
    clock = Clock()
    b = BulkThrottle(share=0.1, interval_ms=250, clock=clock)
    b.intake("m", 0.5)
    assert b.ran("m", 0.5, interactive_active=False) == 0.0
    assert b.pause_left_s("m") == 0.0
    # The intake was used up by that batch, not carried to a later one.
    assert b.ran("m", 0.0, interactive_active=True) == pytest.approx(0.25)
    off = BulkThrottle(share=1.0, interval_ms=0, clock=clock)
    assert not off.enabled
    off.intake("m", 1.0)
    assert off.ran("m", 1.0, interactive_active=True) == 0.0
    assert off.pause_left_s("m") == 0.0


@pytest.mark.parametrize(("share", "interval_ms"), [(0.0, 0), (1.5, 0), (0.5, -1)])
def test_bad_settings_are_refused(share: float, interval_ms: float) -> None:
    with pytest.raises(ValueError):
        BulkThrottle(share=share, interval_ms=interval_ms)
