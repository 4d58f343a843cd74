"""agents.app without a broker: what a role's Faust app starts."""

from __future__ import annotations

from pathlib import Path

from agents.app import create_app
from agents.runtime import Runtime
from pipeline.registry import Registry
from pipeline.settings import Settings


def test_only_a_role_with_faust_agents_starts_the_apps_consumer(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, registry=None, bootstrap_servers=None)
    rt = Runtime(settings, "127.0.0.1:1", Registry({}, None))
    # Router, worker, controller: their own consumers read Kafka; the app's would only
    # join a group and wait for its leader topic (about 6 s of each process's start).
    # (The flags, not the services: building those opens sockets and event loops.)
    host = create_app(rt, app_id="host-app", consumes=False).boot_strategy
    assert host.enable_kafka_consumer is False
    assert host.enable_kafka and host.enable_kafka_producer is None  # the producer stays
    # The stats role's agents and table are fed by the app's consumer.
    stats = create_app(rt, app_id="stats-app").boot_strategy
    assert stats.enable_kafka and stats.enable_kafka_consumer is None
