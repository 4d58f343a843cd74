"""The Faust app: one per process role, configured from :class:`Settings`."""

from __future__ import annotations

import ssl
from typing import Any

import faust
from faust.app.base import BootStrategy

from agents.runtime import Runtime


def _credentials(rt: Runtime) -> Any:
    s = rt.settings
    if s.sasl_mechanism:
        ctx = (
            ssl.create_default_context(cafile=str(s.ssl_cafile) if s.ssl_cafile else None)
            if s.security_protocol == "SASL_SSL"
            else None
        )
        return faust.SASLCredentials(
            username=s.sasl_username,
            password=s.sasl_password,
            mechanism=s.sasl_mechanism,
            ssl_context=ctx,
        )
    if s.security_protocol == "SSL":
        return ssl.create_default_context(cafile=str(s.ssl_cafile) if s.ssl_cafile else None)
    return None


def create_app(rt: Runtime, *, app_id: str, consumes: bool = True) -> faust.App:
    """A Faust app for one role: the process host of its agents.

    The router and worker read and write Kafka through their own batch consumer
    and producer (see :mod:`pipeline.consumer`), so the app's own clients carry
    little traffic; they still follow the settings (broker, credentials, group
    timeouts) so that joining and leaving stay quick.

    With ``consumes`` false (a role with no Faust agent or table) the app's own
    consumer is not started at all. It would read nothing, yet it would join a group
    of its own and wait for Faust's leader-election topic before the app starts:
    about 6 s of each process's start (measured: a router and a worker ready in
    5.9-6.0 s without it, 11.9-12.0 s with it).
    """
    s = rt.settings
    state = s.state_dir / app_id
    state.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=f"kafka://{rt.bootstrap_servers}",
        broker_credentials=_credentials(rt),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        datadir=str(state),
        topic_partitions=s.partitions,
        broker_session_timeout=s.session_timeout_ms / 1000,
        broker_heartbeat_interval=s.heartbeat_interval_ms / 1000,
        broker_rebalance_timeout=s.rebalance_timeout_ms / 1000,
        broker_request_timeout=max(s.session_timeout_ms, s.rebalance_timeout_ms) / 1000 + 5,
        broker_commit_interval=s.commit_interval_ms / 1000,
        consumer_auto_offset_reset="earliest",
    )
    if not consumes:
        app.boot_strategy = BootStrategy(app, enable_kafka_consumer=False)
    return app
