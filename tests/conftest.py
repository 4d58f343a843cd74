"""Shared fixtures: one embedded Kafka-protocol broker per test session.

Integration tests run against the real broker (no Kafka mocks). When it cannot
start, the tests that need it error out instead of being skipped: a silently
skipped integration suite looks green while testing nothing.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

# The repository root, so `pipeline`, `agents` and `schemas` import without an
# editable install of the package.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from pipeline.broker import EmbeddedBroker  # noqa: E402
from pipeline.errors import BrokerError  # noqa: E402
from pipeline.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
async def embedded_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[EmbeddedBroker]:
    """The session's broker process; its output goes to a log file in the temp dir."""
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    broker = EmbeddedBroker(log_path=log_path)
    try:
        await broker.start()
    except BrokerError as exc:
        pytest.fail(f"the embedded broker is required for these tests: {exc}", pytrace=False)
    yield broker
    await broker.stop()


@pytest.fixture(scope="session")
async def broker(embedded_broker: EmbeddedBroker) -> str:
    """Bootstrap servers of the session's embedded broker, ``127.0.0.1:PORT``."""
    return embedded_broker.bootstrap_servers


@pytest.fixture(scope="session")
def settings(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for the session: a topic prefix no other session shares, short group timeouts."""
    return Settings(
        bootstrap_servers=broker,
        topic_prefix=f"it-{uuid.uuid4().hex[:10]}",
        partitions=2,
        model_dir=tmp_path_factory.mktemp("models"),
        # The embedded broker holds a new group's first join for about half the session
        # timeout (rounded up to whole seconds): 3 s here means about 2 s per join.
        session_timeout_ms=3_000,
        rebalance_timeout_ms=3_000,
        heartbeat_interval_ms=300,
    )
