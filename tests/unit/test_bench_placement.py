"""bench.placement: splitting the CPUs and placing every thread of a process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from bench.placement import pin_process, pinned_thread, split_cores, threads_of

ALL = frozenset(os.sched_getaffinity(0))
FIRST = frozenset({min(ALL)})

# A child with a few threads, alive until its stdin closes.
CHILD = """
import sys, threading
for _ in range(3):
    threading.Thread(target=sys.stdin.read, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def affinity_of(pid: int) -> dict[int, frozenset[int]]:
    """Each thread's allowed CPUs."""
    return {tid: frozenset(os.sched_getaffinity(tid)) for tid in threads_of(pid)}


def test_split_gives_the_highest_half_to_compute_and_loses_no_cpu() -> None:
    cores, why = split_cores()
    if len(ALL) < 2:
        assert cores is None
        assert "not enough to split" in why
        return
    assert cores is not None and why == ""
    assert cores.compute | cores.transport == ALL == cores.every
    assert not cores.compute & cores.transport
    assert len(cores.compute) == len(ALL) // 2
    assert min(cores.compute) > max(cores.transport)


def test_pin_process_places_every_thread_and_new_ones_follow() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        before = affinity_of(child.pid)
        assert len(before) >= 4 and all(cpus == ALL for cpus in before.values())
        placed = pin_process(child.pid, FIRST)
        assert placed == len(before)
        assert set(affinity_of(child.pid).values()) == {FIRST}
        pin_process(child.pid, ALL)
        assert set(affinity_of(child.pid).values()) == {ALL}
    finally:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()


def test_pin_process_of_a_gone_process_raises() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    with pytest.raises(OSError, match=f"no thread of process {child.pid}"):
        pin_process(child.pid, FIRST)


def test_pinned_thread_places_the_thread_and_its_children_then_puts_it_back() -> None:
    seen: dict[str, frozenset[int]] = {}

    def child() -> None:
        seen["child"] = frozenset(os.sched_getaffinity(threading.get_native_id()))

    def body() -> None:
        with pinned_thread(FIRST):
            seen["inside"] = frozenset(os.sched_getaffinity(threading.get_native_id()))
            t = threading.Thread(target=child)
            t.start()
            t.join()
        seen["after"] = frozenset(os.sched_getaffinity(threading.get_native_id()))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"inside": FIRST, "child": FIRST, "after": ALL}
    # The calling thread of the test was never touched.
    assert frozenset(os.sched_getaffinity(threading.get_native_id())) == ALL
