"""Rolling worker telemetry up into windowed stats per model, version and priority.

The stats agent keeps one JSON-ready state per window (:func:`new_state`), adds
each telemetry record to it (:func:`add_record`) and, when the window closes,
turns it into :class:`WindowStats` records (:func:`close_window`) for
``<prefix>.metrics``. Everything here is plain code so that it is tested
without a broker or Faust.

Cost of idle capacity: each heartbeat says what its worker cost over the
interval (``hourly_usd * wall_s``). That cost is split over the versions the
worker serves by their share of its compute seconds (evenly when it computed
nothing), so a model pays for the capacity it holds, not only for the seconds it
ran. The part of that cost covered by compute seconds is the compute cost, the
rest is idle cost; utilization is compute seconds over attributed seconds. Per
priority, a version's costs are split by the compute cost charged to each
priority's answers (by answers when nothing was charged). Records with priority
``"*"`` cover every priority of a version; they alone carry the costs of a
version that answered nothing, and the output summary.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from pipeline.cost import cost_per_1000_usd
from pipeline.drift import merge_summaries, summary_from_dict
from pipeline.stats import LatencySketch, SketchData
from pipeline.telemetry import (
    Heartbeat,
    OutputStats,
    RequestSummary,
)

ALL_PRIORITIES = "*"
METRICS_SCHEMA_VERSION = 1

State = dict[str, Any]


class WindowStats(BaseModel):
    """One window's stats of a model version at one priority (``"*"``: all of them)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["window"] = "window"
    schema_version: int = METRICS_SCHEMA_VERSION
    model: str
    version: str
    priority: str
    window_start_ms: int
    window_end_ms: int
    window_s: float
    count: int = Field(description="Answers of every status.")
    ok: int
    statuses: dict[str, int] = Field(default_factory=dict)
    errors: dict[str, int] = Field(default_factory=dict)
    error_rate: float = Field(description="Answers that were not ok, over all answers.")
    rows: int = Field(description="Rows answered ok.")
    throughput_rps: float = Field(description="Answers per second of window.")
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    mean_queue_ms: float | None = None
    mean_batch_size: float | None = Field(
        default=None, description="Rows of the batch an ok answer ran in, averaged over answers."
    )
    latency_ms: SketchData = Field(default_factory=SketchData)
    charged_usd: float = Field(description="Compute cost charged to the answers themselves.")
    compute_s: float = Field(default=0.0, description="ONNX Runtime seconds.")
    capacity_s: float = Field(default=0.0, description="Worker seconds attributed.")
    busy_s: float = Field(
        default=0.0, description="Attributed worker seconds spent computing (<= capacity_s)."
    )
    compute_cost_usd: float = 0.0
    idle_cost_usd: float = 0.0
    total_cost_usd: float = 0.0
    cost_per_1000_usd: float = Field(
        default=0.0, description="Total cost (compute and idle) per 1,000 ok answers."
    )
    compute_cost_per_1000_usd: float = 0.0
    utilization: float | None = Field(
        default=None, description="Compute seconds over the worker seconds attributed."
    )
    workers: list[str] = Field(default_factory=list)
    execution_providers: list[str] = Field(default_factory=list)
    outputs: OutputStats | None = None


def encode_stats(record: WindowStats) -> bytes:
    """JSON bytes of a metrics record."""
    return orjson.dumps(record.model_dump(), option=orjson.OPT_NON_STR_KEYS)


def decode_stats(raw: bytes | str) -> WindowStats:
    """Parse a metrics record; raises ``pydantic.ValidationError`` on a bad one."""
    return WindowStats.model_validate_json(raw)


def new_state() -> State:
    """An empty window state (JSON-ready: it lives in a Faust table's changelog)."""
    return {"requests": {}, "versions": {}}


def _key(*parts: str) -> str:
    return "\x1f".join(parts)


def _add_counts(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def add_record(state: State, record: RequestSummary | Heartbeat) -> None:
    """Add one telemetry record to a window state."""
    if isinstance(record, RequestSummary):
        _add_requests(state, record)
    else:
        _add_heartbeat(state, record)


def _add_requests(state: State, r: RequestSummary) -> None:
    key = _key(r.model, r.version, r.priority)
    acc = state["requests"].get(key)
    if acc is None:
        acc = state["requests"][key] = {
            "model": r.model, "version": r.version, "priority": r.priority, "count": 0,
            "statuses": {}, "errors": {}, "rows": 0,
            "latency": SketchData().model_dump(mode="json"),
            "queue_ms_sum": 0.0, "batch_rows_sum": 0, "cost_usd": 0.0,
        }
    acc["count"] += r.count
    _add_counts(acc["statuses"], r.statuses)
    _add_counts(acc["errors"], r.errors)
    acc["rows"] += r.rows
    sketch = LatencySketch.from_data(acc["latency"])
    sketch.merge(LatencySketch.from_data(r.latency_ms))
    acc["latency"] = sketch.to_data().model_dump(mode="json")
    acc["queue_ms_sum"] += r.queue_ms_sum
    acc["batch_rows_sum"] += r.batch_rows_sum
    acc["cost_usd"] += r.cost_usd


def _add_heartbeat(state: State, hb: Heartbeat) -> None:
    if not hb.served:
        return
    busy, wall = hb.busy_s, hb.wall_s
    # Sessions of several versions may run at once, so busy seconds can exceed wall
    # seconds; compute then covers the whole interval and nothing of it is idle.
    cap = max(busy, wall)
    for v in hb.served:
        share = v.compute_s / busy if busy > 0 else 1.0 / len(hb.served)
        attributed_s = wall * share
        used_s = wall * v.compute_s / cap if cap > 0 else 0.0
        key = _key(v.model, v.version)
        acc = state["versions"].get(key)
        if acc is None:
            acc = state["versions"][key] = {
                "model": v.model, "version": v.version, "attributed_s": 0.0, "used_s": 0.0,
                "compute_s": 0.0, "total_cost_usd": 0.0, "compute_cost_usd": 0.0,
                "workers": [], "providers": [], "outputs": None,
            }
        acc["attributed_s"] += attributed_s
        acc["used_s"] += used_s
        acc["compute_s"] += v.compute_s
        acc["total_cost_usd"] += hb.hourly_usd * attributed_s / 3600.0
        acc["compute_cost_usd"] += hb.hourly_usd * used_s / 3600.0
        if hb.worker not in acc["workers"]:
            acc["workers"].append(hb.worker)
        if v.execution_provider not in acc["providers"]:
            acc["providers"].append(v.execution_provider)
        if v.outputs is not None:
            more = v.outputs.model_dump(mode="json")
            acc["outputs"] = _merge_outputs(acc["outputs"], more)


def _merge_outputs(have: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    if have is None:
        return more
    if have.get("kind") != more.get("kind"):
        return more  # the version's outputs changed kind: keep the newest
    merged = merge_summaries([summary_from_dict(have), summary_from_dict(more)])
    assert merged is not None
    return merged.to_dict()


def close_window(state: State, start_ms: int, end_ms: int) -> list[WindowStats]:
    """The window's records: per (model, version, priority) with traffic, then ``"*"``."""
    window_s = max((end_ms - start_ms) / 1000.0, 1e-9)
    by_version: dict[str, list[dict[str, Any]]] = {}
    for acc in state["requests"].values():
        by_version.setdefault(_key(acc["model"], acc["version"]), []).append(acc)
    out: list[WindowStats] = []
    for vkey in sorted(set(by_version) | set(state["versions"])):
        reqs = sorted(by_version.get(vkey, []), key=lambda a: str(a["priority"]))
        ver = state["versions"].get(vkey)
        model, version = (ver or reqs[0])["model"], (ver or reqs[0])["version"]
        charged = sum(a["cost_usd"] for a in reqs)
        answers = sum(a["count"] for a in reqs)
        for acc in reqs:
            share = (
                acc["cost_usd"] / charged if charged > 0
                else acc["count"] / answers if answers else 0.0
            )
            out.append(_stats(model, version, acc["priority"], [acc], ver, share,
                              start_ms, end_ms, window_s))
        out.append(_stats(model, version, ALL_PRIORITIES, reqs, ver, 1.0,
                          start_ms, end_ms, window_s))
    return out


def _stats(
    model: str, version: str, priority: str, reqs: list[dict[str, Any]],
    ver: dict[str, Any] | None, share: float, start_ms: int, end_ms: int, window_s: float,
) -> WindowStats:
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    sketch = LatencySketch()
    count = rows = batch_rows = 0
    queue_ms = charged = 0.0
    for a in reqs:
        count += a["count"]
        rows += a["rows"]
        batch_rows += a["batch_rows_sum"]
        queue_ms += a["queue_ms_sum"]
        charged += a["cost_usd"]
        _add_counts(statuses, a["statuses"])
        _add_counts(errors, a["errors"])
        sketch.merge(LatencySketch.from_data(a["latency"]))
    ok = statuses.get("ok", 0)
    total = compute = compute_s = capacity_s = busy_s = 0.0
    utilization: float | None = None
    workers: list[str] = []
    providers: list[str] = []
    outputs: Any = None
    if ver is not None:
        total = ver["total_cost_usd"] * share
        compute = ver["compute_cost_usd"] * share
        compute_s = ver["compute_s"] * share
        capacity_s = ver["attributed_s"] * share
        busy_s = ver["used_s"] * share
        if ver["attributed_s"] > 0:
            utilization = ver["used_s"] / ver["attributed_s"]
        workers, providers = sorted(ver["workers"]), sorted(ver["providers"])
        if priority == ALL_PRIORITIES:
            outputs = ver["outputs"]
    return WindowStats(
        model=model, version=version, priority=priority,
        window_start_ms=start_ms, window_end_ms=end_ms, window_s=window_s,
        count=count, ok=ok, statuses=statuses, errors=errors,
        error_rate=(count - ok) / count if count else 0.0,
        rows=rows, throughput_rps=count / window_s,
        p50_ms=sketch.quantile(0.5), p95_ms=sketch.quantile(0.95), p99_ms=sketch.quantile(0.99),
        mean_ms=sketch.mean_ms,
        mean_queue_ms=queue_ms / ok if ok else None,
        mean_batch_size=batch_rows / ok if ok else None,
        latency_ms=sketch.to_data(),
        charged_usd=charged, compute_s=compute_s, capacity_s=capacity_s, busy_s=busy_s,
        compute_cost_usd=compute, idle_cost_usd=max(total - compute, 0.0),
        total_cost_usd=total,
        cost_per_1000_usd=cost_per_1000_usd(total, ok),
        compute_cost_per_1000_usd=cost_per_1000_usd(compute, ok),
        utilization=utilization, workers=workers, execution_providers=providers,
        outputs=outputs,
    )
