"""Where minilm's CPU goes: the pipeline's CPU per text, by process, against raw's.

A cycle's ratio (the pipeline's rate over raw ONNX Runtime's) splits exactly into
two factors, for ``cpus`` CPUs, a rate in texts/s and CPU seconds per text:

    rate / limit = (busy / raw_busy) x (raw_cpu / cpu)   with busy = rate x cpu / cpus

The first factor is how much of the CPUs the pipeline's processes kept busy, against
raw's one process; the second is raw's CPU per text over the pipeline's, all its
processes counted (the worker with its model, the broker, the router, the load
generator or job client). So the table shows whether a gap comes from CPUs left idle
(a stall, a wait for the next batch) or from CPU spent outside the model.

On dedicated cores only the worker counts, against raw on the same cores: the other
processes run on the other cores there, and are listed for reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Processes in the order the table lists them; the load generator is this process.
PROCESSES = ("worker", "broker", "router", "bench_client")


def limit_choice(before: list[dict[str, Any]], after: list[dict[str, Any]]
                 ) -> tuple[float, int, str]:
    """The limit from the raw runs either side of a cycle, and where it was measured.

    ``before`` and ``after`` hold one run per thread configuration, in the same
    order. The limit is, per configuration and batch size, the mean of both sides'
    round rates (rounds are of equal length), the best of those taken. Returns the
    limit, its configuration's index and its batch size.
    """
    pooled = [(float(np.mean(list(b["samples"][size]) + list(a["samples"][size]))), i, size)
              for i, (b, a) in enumerate(zip(before, after, strict=True))
              for size in b["samples"]]
    return max(pooled, key=lambda p: p[0])


def raw_cpu_us(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float | None:
    """Raw's CPU µs per text where the limit was measured: both sides' mean.

    None for raw runs that did not record their CPU.
    """
    _, i, size = limit_choice(before, after)
    per = [r[i].get("cpu_us_per_row_by_batch_size", {}).get(size) for r in (before, after)]
    if any(v is None for v in per):
        return None
    return float(np.mean([float(v) for v in per if v is not None]))


def run_budget(run: dict[str, Any], rows: int, limit: float, raw_us: float | None,
               cpus: int, counted: Sequence[str] | None = None) -> dict[str, Any]:
    """One burst's or job's CPU per text, by process, and the ratio's two factors.

    ``rows`` is the texts the run answered over its ``cpu_s`` window; ``counted``
    names the processes charged to the pipeline (every one measured when None).
    """
    per = {name: 1e6 * float(v) / rows for name, v in run.get("cpu_s", {}).items()}
    names = list(per) if counted is None else [n for n in counted if n in per]
    cpu_us = sum(per[n] for n in names)
    rate = float(run["throughput_rps"])
    out: dict[str, Any] = {"cpu_us_per_text": per, "counted": names, "cpu_us": cpu_us,
                           "cpus": cpus, "busy": rate * cpu_us / 1e6 / cpus}
    if raw_us is not None and cpu_us > 0:
        out |= {"raw_cpu_us": raw_us, "raw_busy": limit * raw_us / 1e6 / cpus,
                "cpu_factor": raw_us / cpu_us}
        out["busy_factor"] = out["busy"] / out["raw_busy"]
    return out


def cycle_budget(burst: dict[str, Any], job: dict[str, Any], limit: float,
                 raw_us: float | None, cpus: int,
                 counted: Sequence[str] | None = None) -> dict[str, Any]:
    """A cycle's burst and job budgets (:func:`run_budget`)."""
    return {"burst": run_budget(burst, int(burst["answered"]), limit, raw_us, cpus, counted),
            "job": run_budget(job, int(job["rows"]), limit, raw_us, cpus, counted)}


def median_cycle_budget(cycles: list[dict[str, Any]], part: str) -> dict[str, Any]:
    """The budget of ``part`` (burst or job) in the cycle whose ratio is the median.

    A whole cycle's figures, not each column's median, so that its two factors
    multiply to the ratio reported; with an even count, the upper of the middle two.
    Empty when no cycle has a budget.
    """
    have = [c for c in cycles if "cpu" in c]
    if not have:
        return {}
    ranked = sorted(have, key=lambda c: float(c[f"{part}_ratio"]))
    chosen = ranked[len(ranked) // 2]
    budget: dict[str, Any] = chosen["cpu"][part]
    return budget | {"cycle": have.index(chosen) + 1, "cycles": len(have)}


def _us(v: float | None) -> str:
    return "n/a" if v is None or np.isnan(v) else f"{v:,.0f}"


def table(summaries: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    """RESULTS.md lines: the median cycle's CPU per text, for each labelled summary.

    Each summary is a :func:`bench.minilm_cycles.summarize_cycles` record; those
    without budgets are left out, and so is the whole table when none has one.
    """
    lines: list[str] = []
    for label, summary in summaries:
        for part, what in (("burst", "burst"), ("job", "bulk job")):
            b = ((summary or {}).get("cpu") or {}).get(part)
            if not b:
                continue
            per = b["cpu_us_per_text"]
            counted = set(b["counted"])
            cells = [_us(per.get(n)) + ("" if n in counted else " (not counted)")
                     for n in PROCESSES]
            ratio = b.get("busy_factor", float("nan")) * b.get("cpu_factor", float("nan"))
            lines.append(
                f"| {label}, {what} (cycle {b['cycle']} of {b['cycles']}) | "
                f"{' | '.join(cells)} | {_us(b['cpu_us'])} | "
                f"{_us(b.get('raw_cpu_us'))} | {b['busy']:.3f} / {b.get('raw_busy', np.nan):.3f} "
                f"| {b.get('busy_factor', np.nan):.3f} | {b.get('cpu_factor', np.nan):.3f} | "
                f"{ratio:.3f} |")
    if not lines:
        return []
    return [
        "", "## Where minilm's CPU goes (per text, the median cycle)", "",
        "CPU µs per text by process over each run, against raw ONNX Runtime's where its "
        "limit was measured (both sides of the cycle, the pipeline stopped). The ratio "
        "splits exactly into the share of the CPUs the counted processes kept busy "
        "against raw's, times raw's CPU per text over theirs (`bench/cpu_budget.py`); "
        "each row is the cycle whose ratio is the median above, so its product is that "
        "ratio. On dedicated cores only the worker counts, against raw on the same "
        "cores; the others run on the other cores.", "",
        "| run | worker | broker | router | load generator | counted | raw ONNX Runtime | "
        "CPUs busy, pipeline / raw | busy factor | CPU factor | product |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *lines,
    ]
