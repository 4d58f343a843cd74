"""Benchmarks of the pipeline against its limits and its peers (``python -m bench``)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare_process() -> None:
    """Set up a bench's driving process before its event loop starts.

    The serve children run ``python -m agents.cli``: the repo root must be importable
    for them too, whether or not inferline is installed. And the collector gets the
    settings ``inferline serve`` uses (agents/serve.py): a load generator keeps tens
    of thousands of responses alive, and the default thresholds make each new one
    pay for walking all of them again.
    """
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
