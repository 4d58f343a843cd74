"""Summaries of responses: per model and priority, the figures DESIGN.md's table shows."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pipeline.cost import cost_per_1000_usd
from schemas import InferenceResponse


@dataclass
class Row:
    """Figures for one (model, priority) group."""

    model: str
    priority: str
    count: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    cost_usd: float = 0.0
    first_ms: float = float("inf")
    last_ms: float = 0.0

    @property
    def throughput_per_s(self) -> float:
        """Responses per second over the span between the group's first and last send."""
        span_s = (self.last_ms - self.first_ms) / 1000
        return self.count / span_s if span_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """Latency percentile of the ok responses, in ms (nan when none)."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def mean_batch_size(self) -> float:
        """Mean rows of the batches that served the ok responses."""
        return float(np.mean(self.batch_sizes)) if self.batch_sizes else 0.0

    @property
    def cost_per_1000_usd(self) -> float:
        """Cost of 1,000 ok responses."""
        return cost_per_1000_usd(self.cost_usd, len(self.batch_sizes))


def summarise(
    responses: Iterable[tuple[InferenceResponse, str, float, float]],
) -> list[Row]:
    """Group ``(response, priority, sent_ms, received_ms)`` tuples by model and priority."""
    rows: dict[tuple[str, str], Row] = defaultdict(lambda: Row("", ""))
    for resp, priority, sent_ms, received_ms in responses:
        key = (resp.model or "(unreadable)", priority)
        row = rows[key]
        row.model, row.priority = key
        row.count += 1
        row.statuses[resp.status] += 1
        row.first_ms = min(row.first_ms, sent_ms)
        row.last_ms = max(row.last_ms, received_ms)
        if resp.status == "ok":
            row.latencies_ms.append(received_ms - sent_ms)
            row.batch_sizes.append(resp.batch_size)
            row.cost_usd += resp.cost_usd
    return [rows[k] for k in sorted(rows)]
