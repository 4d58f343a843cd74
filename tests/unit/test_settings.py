"""pipeline.settings: INFERLINE_* environment variables -> one Settings object."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No INFERLINE_* variable of the calling shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("INFERLINE_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = Settings()
    assert s.bootstrap_servers is None
    assert s.topic_prefix == "inferline"
    assert s.partitions == 4
    assert s.registry is None
    assert s.metrics_port == 0
    assert s.log_level == "INFO"
    assert s.worker_id
    assert s.max_request_bytes == 1_048_576


def test_env_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFERLINE_BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("INFERLINE_TOPIC_PREFIX", "prod.eu")
    monkeypatch.setenv("INFERLINE_REGISTRY", str(tmp_path / "reg.toml"))
    monkeypatch.setenv("INFERLINE_METRICS_PORT", "9464")
    monkeypatch.setenv("INFERLINE_TAKE_WITHIN_MS", "3.5")
    s = Settings()
    assert s.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert s.topic_prefix == "prod.eu"
    assert s.registry == tmp_path / "reg.toml"
    assert s.metrics_port == 9464
    assert s.take_within_ms == 3.5


def test_unprefixed_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPIC_PREFIX", "nope")
    monkeypatch.setenv("PARTITIONS", "9")
    s = Settings()
    assert s.topic_prefix == "inferline"
    assert s.partitions == 4


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("INFERLINE_PARTITIONS", "0"),
        ("INFERLINE_TOPIC_PREFIX", "bad/prefix"),
        ("INFERLINE_METRICS_PORT", "70000"),
        ("INFERLINE_LOG_LEVEL", "LOUD"),
        ("INFERLINE_MAX_REQUEST_BYTES", "10"),
    ],
)
def test_invalid_env_values_are_rejected(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    field = name.removeprefix("INFERLINE_").lower()
    with pytest.raises(ValidationError, match=field):
        Settings()


def test_registry_path_defaults_into_model_dir(tmp_path: Path) -> None:
    s = Settings(model_dir=tmp_path / "models")
    assert s.registry_path == tmp_path / "models" / "registry.toml"
    explicit = Settings(model_dir=tmp_path / "models", registry=tmp_path / "elsewhere.toml")
    assert explicit.registry_path == tmp_path / "elsewhere.toml"


def test_registry_path_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFERLINE_MODEL_DIR", str(tmp_path / "store"))
    assert Settings().registry_path == tmp_path / "store" / "registry.toml"
    monkeypatch.setenv("INFERLINE_REGISTRY", str(tmp_path / "r.toml"))
    assert Settings().registry_path == tmp_path / "r.toml"


def test_topic_names() -> None:
    s = Settings(topic_prefix="ut")
    assert s.topic("requests") == "ut.requests"
    assert s.topic("responses") == "ut.responses"
    assert s.topic("dlq") == "ut.dlq"
    assert s.lane_topic("digits", "high") == "ut.lane.digits.high"
    assert s.lane_topic("minilm", "batch") == "ut.lane.minilm.batch"
    assert s.group_id("router") == "ut-router"
    assert s.group_id("worker") == "ut-worker"
    default = Settings()
    assert default.topic("requests") == "inferline.requests"
    assert default.lane_topic("digits", "normal") == "inferline.lane.digits.normal"


def test_to_env_round_trip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    original = Settings(
        bootstrap_servers="127.0.0.1:19092",
        topic_prefix="rt-1",
        partitions=7,
        registry=tmp_path / "reg.toml",
        model_dir=tmp_path / "models",
        state_dir=tmp_path / "state",
        metrics_port=9100,
        log_level="DEBUG",
        worker_id="worker-7",
        session_timeout_ms=6000,
        max_request_bytes=65536,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password="p w",
        ssl_cafile=tmp_path / "ca.pem",
        take_within_ms=3.25,
        worker_concurrency=3,
        execution_provider="cpu",
        intra_op_threads=2,
    )
    env = original.to_env()
    assert all(k.startswith("INFERLINE_") and isinstance(v, str) for k, v in env.items())
    assert env["INFERLINE_BOOTSTRAP_SERVERS"] == "127.0.0.1:19092"
    assert env["INFERLINE_REGISTRY"] == str(tmp_path / "reg.toml")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rebuilt = Settings()
    assert rebuilt == original
    assert rebuilt.model_dump() == original.model_dump()


def test_to_env_round_trip_of_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings()
    env = original.to_env()
    # Unset options are left out, so the child falls back to the same defaults.
    assert "INFERLINE_BOOTSTRAP_SERVERS" not in env
    assert "INFERLINE_REGISTRY" not in env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings() == original


def test_kafka_security() -> None:
    assert Settings().kafka_security() == {"security_protocol": "PLAINTEXT"}
    sasl = Settings(
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
        sasl_username="u", sasl_password="p",
    ).kafka_security()
    assert sasl == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "u",
        "sasl_plain_password": "p",
    }
    ssl_kwargs = Settings(security_protocol="SSL").kafka_security()
    assert ssl_kwargs["security_protocol"] == "SSL"
    assert "ssl_context" in ssl_kwargs


def test_slow_readers_wait_longer_but_never_less_than_the_fetch_wait() -> None:
    s = Settings(fetch_max_wait_ms=10)
    assert s.fetch_wait_ms() == 10
    assert s.fetch_wait_ms(200) == 200
    assert Settings(fetch_max_wait_ms=500).fetch_wait_ms(200) == 500
