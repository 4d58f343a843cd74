"""The stats agent: worker telemetry in, windowed stats per model, version and priority out.

Telemetry arrives once per interval per worker, so a plain Faust agent keeps up.
Records are added to a tumbling-window Faust table (window ``stats_window_s``);
when a window closes its state is rolled up (see :mod:`pipeline.rollup`) and one
record per model, version and priority, plus one per version for all priorities
(``"*"``), goes to ``<prefix>.metrics``, keyed by model.

The whole window lives under a single table key: Faust closes windows per
partition and then skips any later window whose start is not past the last one it
closed, so a per-model key would lose models whose records came in on another
partition. One stats process per pipeline is the intended deployment; its load is
a few records per worker per second.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from pydantic import ValidationError

from agents.runtime import Runtime
from pipeline.rollup import add_record, close_window, encode_stats, new_state
from pipeline.telemetry import decode_record

log = logging.getLogger("inferline.stats")

WINDOW_KEY = "window"
# How often Faust looks for windows to close; bounds how late a window's stats are.
_CLEANUP_INTERVAL_S = 0.5


def grace_s(rt: Runtime) -> float:
    """How long after its end a window stays open for telemetry still on its way."""
    return rt.settings.telemetry_interval_ms / 1000 + 1.0


def install(app: faust.App, rt: Runtime) -> Any:
    """Add the stats agent and its windowed table to ``app``; returns the agent."""
    s = rt.settings
    window_s = s.stats_window_s
    app.conf.table_cleanup_interval = min(_CLEANUP_INTERVAL_S, window_s / 2)
    telemetry = app.topic(s.topic("telemetry"), key_type=bytes, value_type=bytes)
    metrics = app.topic(s.topic("metrics"), key_type=bytes, value_type=bytes)

    async def on_close(key: Any, state: Any) -> None:
        _, (start_s, _end_s) = key
        if not isinstance(state, dict):
            return
        # Faust's window end is start + size - 0.1 s; the record says where it really ends.
        start_ms = round(start_s * 1000)
        end_ms = start_ms + round(window_s * 1000)
        records = close_window(state, start_ms, end_ms)
        for rec in records:
            await metrics.send(key=rec.model.encode(), value=encode_stats(rec))
        log.info("window %d..%d: %d metrics records", start_ms, end_ms, len(records))

    table = app.Table(
        "stats",
        default=new_state,
        # Keys and values without a model type go to the changelog as JSON.
        key_type=str,
        value_type=dict,
        on_window_close=on_close,
    ).tumbling(window_s, expires=grace_s(rt))

    @app.agent(telemetry, name="inferline-stats")
    async def collect(stream: Any) -> None:
        async for raw in stream:
            try:
                record = decode_record(raw)
            except ValidationError as exc:
                log.warning("skipping a malformed telemetry record: %s", exc)
                continue
            state = table[WINDOW_KEY].value()
            add_record(state, record)
            table[WINDOW_KEY] = state

    return collect
