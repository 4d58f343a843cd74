"""The minilm CPU budget: the ratio split into a busy factor and a CPU factor."""

from __future__ import annotations

from typing import Any

import pytest

from bench.cpu_budget import (
    cycle_budget,
    limit_choice,
    median_cycle_budget,
    raw_cpu_us,
    run_budget,
    table,
)
from bench.minilm_cycles import cycle_limit, cycle_record, summarize_cycles


def raw(samples: dict[str, list[float]], cpu: dict[str, float], best: float) -> dict[str, Any]:
    return {"samples": samples, "cpu_us_per_row_by_batch_size": cpu, "best_rows_per_s": best}


# Two thread configurations: 2x1 is best at 128 before and after, 1x2 is slower.
BEFORE = [raw({"64": [1000.0, 1010.0], "128": [1090.0, 1100.0]}, {"64": 1900.0, "128": 1800.0},
              1100.0),
          raw({"64": [900.0, 905.0], "128": [950.0, 960.0]}, {"64": 2050.0, "128": 1990.0},
              960.0)]
AFTER = [raw({"64": [1005.0, 1000.0], "128": [1100.0, 1110.0]}, {"64": 1910.0, "128": 1820.0},
             1110.0),
         raw({"64": [910.0, 900.0], "128": [955.0, 950.0]}, {"64": 2040.0, "128": 1980.0},
             955.0)]

BURST = {"answered": 10_000, "requests": 10_000, "throughput_rps": 950.0, "ok_share": 1.0,
         "mean_batch_size": 127.0, "p50_ms": 5000.0, "p99_ms": 9000.0,
         "cpu_s": {"bench_client": 0.8, "broker": 1.0, "router": 0.3, "worker": 19.5}}
JOB = {"rows": 10_000, "throughput_rps": 980.0, "ok_share": 1.0, "state": "completed",
       "p50_ms": 500.0, "cost_usd": 0.002,
       "cpu_s": {"bench_client": 0.5, "broker": 0.66, "router": 0.2, "worker": 18.7}}


def test_the_limit_is_the_best_pooled_configuration_and_size_and_its_cpu_is_there() -> None:
    limit, index, size = limit_choice(BEFORE, AFTER)
    assert (index, size) == (0, "128")
    assert limit == pytest.approx((1090 + 1100 + 1100 + 1110) / 4)
    assert cycle_limit(BEFORE, AFTER) == (limit, 1110.0)
    # Raw's CPU per text is taken where its limit was measured, both sides' mean.
    assert raw_cpu_us(BEFORE, AFTER) == pytest.approx(1810.0)
    # Raw runs that did not record their CPU give none, rather than a wrong size's.
    bare = [{k: v for k, v in r.items() if k != "cpu_us_per_row_by_batch_size"} for r in AFTER]
    assert raw_cpu_us(BEFORE, bare) is None


def test_busy_factor_times_cpu_factor_is_the_ratio() -> None:
    limit = 1100.0
    b = run_budget(JOB, 10_000, limit, 1810.0, 2)
    assert b["cpu_us_per_text"]["worker"] == pytest.approx(1870.0)
    assert b["cpu_us"] == pytest.approx(2006.0)
    assert b["busy"] == pytest.approx(980.0 * 2006e-6 / 2)
    assert b["raw_busy"] == pytest.approx(1100.0 * 1810e-6 / 2)
    assert b["cpu_factor"] == pytest.approx(1810.0 / 2006.0)
    assert b["busy_factor"] * b["cpu_factor"] == pytest.approx(980.0 / limit)


def test_on_dedicated_cores_only_the_worker_counts() -> None:
    b = run_budget(JOB, 10_000, 560.0, 1760.0, 1, counted=("worker",))
    assert b["counted"] == ["worker"]
    assert b["cpu_us"] == pytest.approx(1870.0)
    # The other processes are still measured, for reference.
    assert set(b["cpu_us_per_text"]) == {"bench_client", "broker", "router", "worker"}
    assert b["busy_factor"] * b["cpu_factor"] == pytest.approx(980.0 / 560.0)


def test_a_run_without_raw_cpu_has_no_factors() -> None:
    b = run_budget(JOB, 10_000, 1100.0, None, 2)
    assert "cpu_factor" not in b and "busy_factor" not in b
    assert b["busy"] > 0


def test_the_summary_takes_the_median_cycles_budget_whole() -> None:
    cycles = []
    for worker_s in (19.0, 21.0, 19.5):
        burst = BURST | {"cpu_s": BURST["cpu_s"] | {"worker": worker_s}}
        # A slower cycle answers fewer texts a second for the same CPU per text.
        burst["throughput_rps"] = 950.0 * 19.0 / worker_s
        cycles.append(cycle_record(burst, JOB, BEFORE, AFTER, 2))
    assert cycles[0]["cpu"] == cycle_budget(
        cycles[0]["burst"], JOB, cycles[0]["limit_rows_per_s"], 1810.0, 2)
    summary = summarize_cycles(cycles)
    burst = summary["cpu"]["burst"]
    # The median ratio is the third cycle's (19.5 s of worker CPU), and all its
    # columns are that cycle's, so its factors multiply to the ratio reported.
    assert (burst["cycle"], burst["cycles"]) == (3, 3)
    assert burst["cpu_us_per_text"]["worker"] == pytest.approx(1950.0)
    assert burst["busy_factor"] * burst["cpu_factor"] == pytest.approx(summary["ratio"])
    assert summary["cpu"]["job"]["cpu_factor"] == pytest.approx(1810.0 / 2006.0)


def test_without_budgets_there_is_no_median_cycle_budget() -> None:
    cycle = cycle_record(BURST, JOB, BEFORE, AFTER, 2)
    del cycle["cpu"]
    assert median_cycle_budget([cycle], "job") == {}
    assert median_cycle_budget([], "burst") == {}


def test_the_table_lists_each_part_and_marks_processes_not_counted() -> None:
    whole = summarize_cycles([cycle_record(BURST, JOB, BEFORE, AFTER, 2)])
    dedicated = summarize_cycles([cycle_record(BURST, JOB, BEFORE, AFTER, 1, ("worker",))])
    lines = table([("whole machine", whole), ("worker on dedicated cores", dedicated),
                   ("skipped", {"skipped": "one CPU"})])
    rows = [line for line in lines if line.startswith("| whole") or line.startswith("| worker")]
    assert len(rows) == 4
    job_row = next(r for r in rows if r.startswith("| whole machine, bulk job (cycle 1 of 1)"))
    cells = [c.strip() for c in job_row.strip("|").split("|")]
    assert cells[1:6] == ["1,870", "66", "20", "50", "2,006"]
    assert cells[6] == "1,810"
    product = float(cells[-1])
    assert product == pytest.approx(980.0 / cycle_limit(BEFORE, AFTER)[0], abs=1e-3)
    assert "(not counted)" in next(r for r in rows if r.startswith("| worker on dedicated"))
    assert table([("whole machine", None)]) == []
