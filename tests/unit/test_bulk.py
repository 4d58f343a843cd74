"""BulkThrottle: pauses between bulk batches while interactive traffic flows; IntakeSizer."""

from __future__ import annotations

import pytest

from pipeline.bulk import BulkThrottle, IntakeSizer


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


def test_intake_chunks_shrink_as_records_pack_more_rows() -> None:
    sizer = IntakeSizer(target_s=0.001, most=32)
    assert sizer.records == 32  # nothing measured yet
    # One-row records at 25 µs each: the cap, not the target, bounds the chunk.
    assert sizer.took(32, 32 * 25e-6) == 32
    # Records packing 16 rows cost about 105 µs: the average moves toward them and
    # the chunk shrinks step by step to about a millisecond's worth.
    counts = [sizer.took(8, 8 * 105e-6) for _ in range(30)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] < 32 and counts[-1] == int(0.001 / 105e-6) == 9
    # A record dearer than the whole target still goes, alone.
    assert IntakeSizer(target_s=0.001, most=32, weight=1).took(2, 0.005) == 1
    assert sizer.took(0, 1.0) == 9  # an empty chunk teaches nothing
    with pytest.raises(ValueError):
        IntakeSizer(target_s=0, most=32)
