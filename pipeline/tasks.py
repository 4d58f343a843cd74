"""Background tasks of long-lived components."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Self


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has finished unwinding.

    Components stop their background loops with this, so that nothing of theirs
    still runs once ``stop()`` returns.
    """
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Lifecycle:
    """``async with`` over a long-lived component's ``start()`` and ``stop()``.

    Subclasses define both; ``stop()`` is idempotent, so leaving the block after an
    explicit stop is harmless.
    """

    async def start(self) -> object:
        """Start the component's connections and background tasks."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop it: cancel and await its background tasks, close its connections."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
