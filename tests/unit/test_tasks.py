"""pipeline.tasks: stopping background tasks, and ``async with`` over start/stop."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.tasks import Lifecycle, cancel_and_wait

pytestmark = pytest.mark.timeout(30)


class Recorder(Lifecycle):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def start(self) -> str:
        self.calls.append("start")
        return "started"

    async def stop(self) -> None:
        self.calls.append("stop")


async def test_cancel_and_wait_returns_once_the_task_has_unwound() -> None:
    unwound = asyncio.Event()

    async def loop() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            unwound.set()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()
    assert unwound.is_set()


async def test_cancel_and_wait_takes_none_and_finished_tasks() -> None:
    await cancel_and_wait(None)
    task = asyncio.create_task(asyncio.sleep(0, result=7))
    await task
    await cancel_and_wait(task)
    assert task.result() == 7


async def test_lifecycle_starts_on_entry_and_stops_on_exit() -> None:
    component = Recorder()
    async with component as entered:
        assert entered is component
        assert component.calls == ["start"]
    assert component.calls == ["start", "stop"]


async def test_lifecycle_stops_when_the_block_raises() -> None:
    component = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        async with component:
            raise RuntimeError("boom")
    assert component.calls == ["start", "stop"]


async def test_lifecycle_without_start_and_stop_is_an_error() -> None:
    with pytest.raises(NotImplementedError):
        async with Lifecycle():
            pass
