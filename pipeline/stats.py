"""Mergeable latency sketches: fixed log-spaced histogram buckets, added bucket by bucket.

Every worker summarises its latencies per telemetry interval into a sketch; the
stats agent adds the sketches of every worker and interval of a window and reads
quantiles off the sum. Because the bucket bounds are fixed (not data dependent),
merging is exact addition: the merged sketch is the sketch of the union of the
samples. Bucket ``i`` holds values in ``[MIN_MS * GROWTH**i, MIN_MS * GROWTH**(i+1))``;
a quantile is reported as its bucket's geometric midpoint, clamped to the exact
minimum and maximum, so its relative error is at most ``(GROWTH - 1) / 2`` (2 %).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

GROWTH = 1.04
MIN_MS = 0.01
_LOG_GROWTH = math.log(GROWTH)
_LOG_MIN = math.log(MIN_MS)


def bucket_of(value_ms: float) -> int:
    """Index of the bucket holding ``value_ms``; values at or below ``MIN_MS`` go to 0."""
    if not value_ms > MIN_MS:  # also catches NaN
        return 0
    return int((math.log(value_ms) - _LOG_MIN) / _LOG_GROWTH)


def bucket_value(index: int) -> float:
    """Representative value of a bucket: the geometric midpoint of its bounds."""
    return float(MIN_MS * GROWTH ** (index + 0.5))


class SketchData(BaseModel):
    """The wire form of a :class:`LatencySketch` (bucket index -> count)."""

    model_config = ConfigDict(extra="forbid")

    counts: dict[int, int] = Field(default_factory=dict)
    count: int = Field(default=0, ge=0)
    sum_ms: float = 0.0
    min_ms: float | None = None
    max_ms: float | None = None


class LatencySketch:
    """A log-bucketed histogram of milliseconds: cheap to add to, exact to merge."""

    __slots__ = ("count", "counts", "max_ms", "min_ms", "sum_ms")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.sum_ms = 0.0
        self.min_ms = math.inf
        self.max_ms = -math.inf

    def add(self, value_ms: float) -> None:
        """Record one value (the per-message path: a log and a few additions)."""
        i = bucket_of(value_ms)
        counts = self.counts
        counts[i] = counts.get(i, 0) + 1
        self.count += 1
        self.sum_ms += value_ms
        if value_ms < self.min_ms:
            self.min_ms = value_ms
        if value_ms > self.max_ms:
            self.max_ms = value_ms

    def add_array(self, values_ms: np.ndarray[Any, Any]) -> None:
        """Record many values at once."""
        v = np.asarray(values_ms, dtype=np.float64).ravel()
        if v.size == 0:
            return
        idx = np.zeros(v.shape, dtype=np.int64)
        above = v > MIN_MS
        idx[above] = ((np.log(v[above]) - _LOG_MIN) / _LOG_GROWTH).astype(np.int64)
        # Indices stay small (about 530 buckets span 0.01 ms to 10^7 ms): a dense count.
        dense = np.bincount(idx)
        nonzero = np.flatnonzero(dense)
        counts = self.counts
        for i, c in zip(nonzero.tolist(), dense[nonzero].tolist(), strict=True):
            counts[i] = counts.get(i, 0) + c
        self.count += int(v.size)
        self.sum_ms += float(v.sum())
        self.min_ms = min(self.min_ms, float(v.min()))
        self.max_ms = max(self.max_ms, float(v.max()))

    def merge(self, other: LatencySketch) -> LatencySketch:
        """Add ``other``'s samples to this sketch; returns self."""
        counts = self.counts
        for i, c in other.counts.items():
            counts[i] = counts.get(i, 0) + c
        self.count += other.count
        self.sum_ms += other.sum_ms
        self.min_ms = min(self.min_ms, other.min_ms)
        self.max_ms = max(self.max_ms, other.max_ms)
        return self

    @property
    def mean_ms(self) -> float | None:
        """Exact mean of the samples; None when empty."""
        return self.sum_ms / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile (0..1) by nearest rank; None when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q={q} must be within 0..1")
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        # The extremes are known exactly; only ranks in between need a bucket.
        if rank == 1:
            return self.min_ms
        if rank >= self.count:
            return self.max_ms
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                return min(max(bucket_value(i), self.min_ms), self.max_ms)
        return self.max_ms  # unreachable while counts sum to count

    def to_data(self) -> SketchData:
        """The wire form."""
        return SketchData(
            counts=dict(self.counts),
            count=self.count,
            sum_ms=self.sum_ms,
            min_ms=self.min_ms if self.count else None,
            max_ms=self.max_ms if self.count else None,
        )

    @classmethod
    def from_data(cls, data: SketchData | dict[str, Any]) -> LatencySketch:
        """Rebuild a sketch from its wire form (a model or its JSON dict)."""
        d = data if isinstance(data, SketchData) else SketchData.model_validate(data)
        s = cls()
        s.counts = {int(k): int(v) for k, v in d.counts.items()}
        s.count = d.count
        s.sum_ms = d.sum_ms
        s.min_ms = d.min_ms if d.min_ms is not None else math.inf
        s.max_ms = d.max_ms if d.max_ms is not None else -math.inf
        return s

    @classmethod
    def merged(cls, sketches: Iterable[LatencySketch]) -> LatencySketch:
        """One sketch of the union of ``sketches``' samples."""
        out = cls()
        for s in sketches:
            out.merge(s)
        return out
