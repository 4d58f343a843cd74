"""Kafka security settings reach every client: a broker that refuses SASL proves it.

The embedded broker speaks PLAINTEXT only, so a client configured for SASL fails
its handshake with UnsupportedSaslMechanism: the failure itself shows that the
setting was passed down. The same calls with the default settings succeed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

import pytest

from agents.app import create_app
from agents.runtime import AgentProducer, Runtime
from pipeline.client import InferenceClient, ResponseConsumer
from pipeline.consumer import BatchConsumer
from pipeline.errors import BrokerError
from pipeline.registry import Registry
from pipeline.settings import Settings
from pipeline.topics import ensure_topics

SASL = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
        "sasl_username": "svc", "sasl_password": "secret"}


async def _noop(records: object) -> None:
    return None


def _starts(s: Settings, broker: str) -> dict[str, Callable[[], Awaitable[object]]]:
    topic = f"{s.topic_prefix}.sec-{uuid.uuid4().hex[:6]}"
    return {
        "admin (ensure_topics)": lambda: ensure_topics(s, broker, [topic]),
        "inference client": lambda: InferenceClient(s, bootstrap_servers=broker).start(),
        "agent producer": lambda: AgentProducer(s, broker).start(),
        "batch consumer": lambda: BatchConsumer(
            s, broker, topics=[topic], group_id=f"{topic}-g", handler=_noop).start(),
        "response consumer": lambda: ResponseConsumer(
            s, bootstrap_servers=broker, topics=[topic], group_id=f"{topic}-r").start(),
    }


@pytest.mark.parametrize("client", list(_starts(Settings(), "x:1")))
async def test_sasl_settings_reach_every_client(
    client: str, settings: Settings, broker: str, caplog: pytest.LogCaptureFixture
) -> None:
    sasl = settings.model_copy(update=SASL)
    caplog.set_level(logging.ERROR, logger="aiokafka")
    with pytest.raises((BrokerError, Exception)):
        await _starts(sasl, broker)[client]()
    assert "UnsupportedSaslMechanism" in caplog.text, caplog.text[-2000:]


async def test_plaintext_clients_connect(settings: Settings, broker: str) -> None:
    topic = f"{settings.topic_prefix}.sec-{uuid.uuid4().hex[:6]}"
    await ensure_topics(settings, broker, [topic])
    clients = [
        InferenceClient(settings, bootstrap_servers=broker),
        AgentProducer(settings, broker),
        BatchConsumer(settings, broker, topics=[topic], group_id=f"{topic}-g", handler=_noop),
        ResponseConsumer(settings, bootstrap_servers=broker, topics=[topic],
                         group_id=f"{topic}-r"),
    ]
    for c in clients:
        await c.start()
    for c in clients:
        await c.stop()


def test_faust_app_gets_sasl_credentials(settings: Settings) -> None:
    sasl = settings.model_copy(update=SASL)
    rt = Runtime(sasl, "127.0.0.1:1", Registry({}, None))
    creds = create_app(rt, app_id="sec-app").conf.broker_credentials
    assert creds is not None
    assert creds.username == "svc" and creds.password == "secret"
    assert str(creds.mechanism).endswith("PLAIN")
