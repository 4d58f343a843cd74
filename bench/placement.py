"""CPU placement for the bench's dedicated-core comparison (Linux CPU affinity).

On a machine this small the broker, the router and the load generator share the
cores that compute, so a whole-machine comparison with raw ONNX Runtime charges
the pipeline for processes a deployment runs elsewhere. The dedicated-core
comparison splits the machine instead: the worker computes on the *compute*
cores and everything else runs on the *transport* cores; raw ONNX Runtime is then
measured on the same compute cores, with the pipeline stopped.

Affinity is per thread on Linux and new threads inherit their creator's, so a
process is placed by placing every thread it has; threads it starts later follow.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Cores:
    """The split of this process's CPUs: ``compute`` for the worker, the rest for transport."""

    compute: frozenset[int]
    transport: frozenset[int]

    @property
    def every(self) -> frozenset[int]:
        """All the CPUs of the split, to put a process back where it was."""
        return self.compute | self.transport


def split_cores() -> tuple[Cores | None, str]:
    """Half of this process's CPUs (the highest numbered) to compute, the others to transport.

    Returns the split and an empty string, or None and why there is none: CPU
    affinity is Linux-only, and one CPU cannot be split.
    """
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        return None, "this platform has no CPU affinity calls"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, f"this process may run on {len(cpus)} CPU, not enough to split"
    half = len(cpus) // 2
    return Cores(compute=frozenset(cpus[-half:]), transport=frozenset(cpus[:-half])), ""


def threads_of(pid: int) -> list[int]:
    """Thread ids of process ``pid`` (empty once it has exited)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def pin_process(pid: int, cpus: Iterable[int]) -> int:
    """Restrict every thread of ``pid`` to ``cpus``; returns how many threads were placed.

    A thread that exits between the listing and the call is passed over; a process
    with no thread left placed raises :class:`OSError`, so that a comparison never
    runs believing in a placement it does not have.
    """
    want = set(cpus)
    placed = 0
    for tid in threads_of(pid):
        try:
            os.sched_setaffinity(tid, want)
        except ProcessLookupError:
            continue
        placed += 1
    if not placed:
        raise OSError(f"no thread of process {pid} could be placed on CPUs {sorted(want)}")
    return placed


@contextlib.contextmanager
def pinned_thread(cpus: Iterable[int]) -> Iterator[None]:
    """Run the calling thread (and the threads it starts) on ``cpus``, then put it back."""
    tid = threading.get_native_id()
    before = os.sched_getaffinity(tid)
    os.sched_setaffinity(tid, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(tid, before)
