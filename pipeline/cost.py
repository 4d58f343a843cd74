"""Cost per inference: each message pays its share of its batch's compute time.

``cost_usd = hourly_usd / 3600 * batch compute seconds * rows / batch rows``.
Idle capacity is not charged to messages here; it is a property of the pool.
"""

from __future__ import annotations

import math


def message_cost_usd(hourly_usd: float, compute_s: float, rows: int, batch_rows: int) -> float:
    """A message's share of its batch's compute cost, in US dollars."""
    if not (
        math.isfinite(hourly_usd)
        and math.isfinite(compute_s)
        and hourly_usd >= 0
        and compute_s >= 0
    ):
        raise ValueError(
            f"hourly_usd={hourly_usd} and compute_s={compute_s} must be finite and >= 0"
        )
    if not 0 < rows <= batch_rows:
        raise ValueError(f"rows={rows} must be in 1..batch_rows={batch_rows}")
    return hourly_usd / 3600.0 * compute_s * rows / batch_rows


def cost_per_1000_usd(total_cost_usd: float, count: int) -> float:
    """Average cost of 1,000 inferences; 0 when nothing ran."""
    return 1000.0 * total_cost_usd / count if count else 0.0
