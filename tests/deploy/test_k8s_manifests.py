"""deploy/k8s: the manifests parse and agree with the code: settings are Settings fields,
each worker Deployment serves one pool, and each KEDA ScaledObject watches that pool's
consumer group on exactly its lane topics (pipeline/settings.py, pipeline/topics.py)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from pydantic import ValidationError

from agents.cli import build_parser
from pipeline.settings import Settings
from pipeline.topics import PRIORITIES, lane_topics
from tests.deploy.conftest import DEPLOY, dockerfile_pools, load_yaml, load_yaml_docs

K8S = DEPLOY / "k8s"


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of the kustomization's resources, by (kind, name)."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_yaml_docs(K8S / name):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), (name, doc)
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, key
            out[key] = doc
    return out


def _of_kind(objects: dict[tuple[str, str], dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for (k, _), o in objects.items() if k == kind]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def _settings(objects: dict[tuple[str, str], dict[str, Any]], deployment: dict[str, Any]
              ) -> Settings:
    """The Settings a Deployment's container gets: ConfigMap, Secret, then its own env."""
    values: dict[str, str] = {}
    container = _container(deployment)
    for source in container.get("envFrom", ()):
        if "configMapRef" in source:
            values.update(objects[("ConfigMap", source["configMapRef"]["name"])]["data"])
        else:
            values.update(objects[("Secret", source["secretRef"]["name"])]["stringData"])
    for var in container.get("env", ()):
        values[var["name"]] = var.get("value", "from-field")
    fields = {}
    for key, value in values.items():
        if key.startswith("INFERLINE_"):
            field = key.removeprefix("INFERLINE_").lower()
            assert field in Settings.model_fields, f"{key} is not a Settings field"
            fields[field] = value
    try:
        return Settings.model_validate(fields)
    except ValidationError as exc:
        pytest.fail(f"{deployment['metadata']['name']}: {exc}")


def test_deployments_run_real_commands(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    parser = build_parser()
    roles = {}
    for d in _of_kind(objects, "Deployment"):
        spec = d["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"][
            "labels"].items()
        args = parser.parse_args(_container(d)["args"])
        roles[d["metadata"]["name"]] = args.role
        _settings(objects, d)  # every INFERLINE_ variable is a valid setting
    assert roles == {
        "inferline-router": "router", "inferline-stats": "stats",
        "inferline-controller": "controller",
        "inferline-worker-cpu": "worker", "inferline-worker-gpu": "worker",
    }


def test_one_worker_deployment_per_pool(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    pools = defaultdict(list)
    for model, pool in dockerfile_pools().items():
        pools[pool].append(model)
    assert dict(pools) == {"cpu": ["digits"], "gpu": ["minilm"]}
    for pool in pools:
        d = objects[("Deployment", f"inferline-worker-{pool}")]
        args = _container(d)["args"]
        assert args[args.index("--pool") + 1] == pool
        assert _settings(objects, d).pool == pool
    gpu = _container(objects[("Deployment", "inferline-worker-gpu")])
    cpu = _container(objects[("Deployment", "inferline-worker-cpu")])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert _settings(objects, objects[("Deployment", "inferline-worker-gpu")]
                     ).execution_provider == "cuda"


def test_scaled_objects_watch_each_pool_group_on_its_lanes(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    models_of: dict[str, list[str]] = defaultdict(list)
    for model, pool in dockerfile_pools().items():
        models_of[pool].append(model)
    scaled = _of_kind(objects, "ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == {
        f"inferline-worker-{pool}" for pool in models_of
    }
    for so in scaled:
        target = objects[("Deployment", so["spec"]["scaleTargetRef"]["name"])]
        settings = _settings(objects, target)
        triggers = so["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"kafka"}
        meta = [t["metadata"] for t in triggers]
        assert {m["consumerGroup"] for m in meta} == {settings.worker_group_id()}
        assert {m["bootstrapServers"] for m in meta} == {settings.bootstrap_servers}
        topics = [m["topic"] for m in meta]
        assert sorted(topics) == sorted(lane_topics(settings, models_of[settings.pool]))
        assert len(topics) == len(models_of[settings.pool]) * len(PRIORITIES)
        # A high lane asks for a replica at a smaller backlog than a batch lane.
        lag = {m["topic"].rsplit(".", 1)[1]: int(m["lagThreshold"]) for m in meta}
        assert lag["high"] < lag["normal"] < lag["batch"]
        # Replicas beyond the partitions of a lane would get no partition to consume.
        assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
        assert so["spec"]["maxReplicaCount"] <= settings.partitions
        for t in triggers:
            auth = objects[("TriggerAuthentication", t["authenticationRef"]["name"])]
            for ref in auth["spec"]["secretTargetRef"]:
                assert ref["key"] in objects[("Secret", ref["name"])]["stringData"], ref

