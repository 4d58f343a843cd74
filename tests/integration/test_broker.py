"""EmbeddedBroker lifecycle and ensure_topics, against the real Tansu binary."""

from __future__ import annotations

import asyncio
import socket
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.broker import EmbeddedBroker, free_port
from pipeline.errors import BrokerError
from pipeline.settings import Settings
from pipeline.topics import ensure_topics, exact_end_offsets, fixed_topics, lane_topics
from tests.integration.conftest import produce_batches

pytestmark = pytest.mark.broker

_ROOT = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    """Whether a process has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def _partition_counts(bootstrap: str, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


async def _until_gone(pid: int) -> None:
    # SIGKILL is delivered asynchronously; no deadline of our own, pytest-timeout bounds it.
    while not _gone(pid):  # noqa: ASYNC110
        await asyncio.sleep(0.01)


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake-broker"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


async def test_start_stop_is_idempotent(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log")
    bootstrap = await broker.start()
    assert bootstrap == broker.bootstrap_servers
    assert bootstrap.startswith("127.0.0.1:")
    assert await broker.start() == bootstrap
    pid = broker.pid
    assert pid is not None and broker.running
    assert await _partition_counts(bootstrap, []) == {}
    await broker.stop()
    await broker.stop()
    assert _gone(pid)
    assert not broker.running
    with pytest.raises(BrokerError, match="not running"):
        _ = broker.bootstrap_servers
    assert "ready" in (tmp_path / "broker.log").read_text()


def _runtime_threads_asked(pid: int) -> str | None:
    """The worker count the broker's async runtime (tokio) was started with, if any."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        name, _, value = item.partition(b"=")
        if name == b"TOKIO_WORKER_THREADS":
            return value.decode()
    return None


async def test_the_broker_is_started_with_the_runtime_threads_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TOKIO_WORKER_THREADS", raising=False)
    # One by default; 0 leaves the runtime its own default (one per core).
    for kwargs, asked in (({}, "1"), ({"threads": 3}, "3"), ({"threads": 0}, None)):
        async with EmbeddedBroker(**kwargs) as broker:
            assert broker.pid is not None
            assert await _partition_counts(broker.bootstrap_servers, []) == {}
            assert _runtime_threads_asked(broker.pid) == asked
    with pytest.raises(ValueError, match="threads"):
        EmbeddedBroker(threads=-1)


async def test_context_manager_and_fixed_port() -> None:
    port = free_port()
    async with EmbeddedBroker(port=port) as broker:
        assert broker.bootstrap_servers == f"127.0.0.1:{port}"
        pid = broker.pid
    assert pid is not None and _gone(pid)


async def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tansu"
    with pytest.raises(BrokerError, match="does not exist") as info:
        await EmbeddedBroker(binary=missing).start()
    assert str(missing) in str(info.value)


async def test_binary_that_cannot_execute(tmp_path: Path) -> None:
    path = tmp_path / "not-executable"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o644)
    with pytest.raises(BrokerError, match="not executable"):
        await EmbeddedBroker(binary=path).start()


async def test_early_exit_reports_code_and_output(tmp_path: Path) -> None:
    binary = _script(tmp_path, "echo 'config rejected: bad listener'\nexit 3\n")
    with pytest.raises(BrokerError) as info:
        await EmbeddedBroker(binary=binary).start()
    message = str(info.value)
    assert "exit code 3" in message
    assert "config rejected: bad listener" in message


async def test_broker_that_never_gets_ready_times_out(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    binary = _script(tmp_path, f"echo $$ > {marker}\nexec sleep 600\n")
    with pytest.raises(BrokerError, match="did not become ready"):
        await EmbeddedBroker(binary=binary, startup_timeout_ms=300).start()
    # On a loaded machine the script may have been killed before it wrote its pid.
    if marker.exists() and marker.read_text().strip():
        assert _gone(int(marker.read_text()))


async def test_port_in_use_is_reported(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerError, match="exit code") as info:
            await EmbeddedBroker(port=port, log_path=tmp_path / "b.log").start()
    assert "in use" in str(info.value).lower()


async def test_interpreter_exit_kills_a_broker_left_running() -> None:
    code = (
        "import asyncio, sys\n"
        f"sys.path.insert(0, {str(_ROOT)!r})\n"
        "from pipeline.broker import EmbeddedBroker\n"
        "async def main():\n"
        "    b = EmbeddedBroker()\n"
        "    await b.start()\n"
        "    print(b.pid, flush=True)\n"
        "    return b\n"
        "keep = asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    await _until_gone(int(out.split()[0]))


async def test_ensure_topics_creates_with_partition_count(broker: str, settings: Settings) -> None:
    # A prefix of its own: the session's topics may already exist (the pipeline fixture).
    settings = settings.model_copy(update={"topic_prefix": f"parts-{uuid.uuid4().hex[:8]}"})
    names = [*fixed_topics(settings), *lane_topics(settings, ["digits"])]
    await ensure_topics(
        settings, broker, names, partitions=3, compacted=[settings.topic("control")]
    )
    assert await _partition_counts(broker, names) == dict.fromkeys(names, 3)
    # Existing topics are left alone, new ones get the default count.
    extra = f"{settings.topic_prefix}.extra-{uuid.uuid4().hex[:6]}"
    await ensure_topics(settings, broker, [*names, extra])
    counts = await _partition_counts(broker, [*names, extra])
    assert counts[extra] == settings.partitions
    assert all(counts[name] == 3 for name in names)


async def test_ensure_topics_unreachable_broker_names_the_address(settings: Settings) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    with pytest.raises(BrokerError, match=bootstrap.replace(".", r"\.")):
        await ensure_topics(settings, bootstrap, ["nowhere"])


async def test_exact_end_offsets_past_the_last_batch(broker: str, settings: Settings) -> None:
    prefix = f"ends-{uuid.uuid4().hex[:8]}"
    topic, empty = f"{prefix}.batches", f"{prefix}.empty"
    await ensure_topics(settings, broker, [topic, empty], partitions=2)
    await produce_batches(broker, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False,
                                fetch_max_wait_ms=10)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in (topic, empty) for p in (0, 1)]
        consumer.assign(tps)
        listed = await consumer.end_offsets(tps)
        # The embedded broker's listed end of the batches' partition: one past the first
        # record of the last batch (a broker that lists the true end passes as well).
        assert listed[tps[0]] in (12, 111)
        exact = await exact_end_offsets(consumer, tps)
        assert exact == {tps[0]: 111, tps[1]: 0, tps[2]: 0, tps[3]: 0}
        assert await exact_end_offsets(consumer, []) == {}
    finally:
        await consumer.stop()
