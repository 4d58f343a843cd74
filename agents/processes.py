"""Starting and stopping ``inferline serve`` child processes (demo, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.settings import Settings


class ServeProcess:
    """One ``inferline serve --role ROLE`` child, with its output in a log file."""

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        role: str,
        *,
        models: Sequence[str] | None = None,
        worker_id: str | None = None,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.role = role
        self.settings = settings.model_copy(
            update={"bootstrap_servers": bootstrap_servers, "worker_id": worker_id or
                    f"{settings.worker_id}-{role}"}
        )
        self.args = ["serve", "--role", role, *extra_args]
        if models:
            self.args += ["--models", ",".join(models)]
        self.log_path = log_path or settings.state_dir / "logs" / f"{self.settings.worker_id}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Spawn the child (idempotent)."""
        if self.proc is not None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The child inherits this environment with the settings written over it.
        env = {**os.environ, **self.settings.to_env()}
        log = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agents.cli", *self.args,
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()

    @property
    def returncode(self) -> int | None:
        """Exit status once the child has ended."""
        return self.proc.returncode if self.proc else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal to the child."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s``; returns the exit status (idempotent)."""
        if self.proc is None:
            return None
        await stop_process(self.proc, grace_s)
        return self.proc.returncode

    def tail(self, lines: int = 40) -> str:
        """The last lines of the child's log, for error messages."""
        return log_tail(self.log_path, lines)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of the log file at ``path`` ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def stop_process(proc: asyncio.subprocess.Process, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL to its process group if it has not exited within ``grace_s``.

    The children here are started in sessions of their own, so the group is the
    child and whatever it started (Ray Serve's workers, say).
    """
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
