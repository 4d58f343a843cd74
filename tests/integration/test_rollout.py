"""Pools, warm-up gating, canary and shadow rollouts through a real pipeline.

One ``inferline serve --role all`` process (router, default-pool worker and the
canary controller) serves several registry entries built from digits versions:
1 (seed 0), 2 (retrained with seed 1: a good candidate) and 3 (version 1 with
its labels shifted by one: a bad candidate). Each test uses its own model name,
so their rollouts do not meet.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from agents.processes import ServeProcess
from pipeline import deploy
from pipeline.broker import free_port
from pipeline.client import InferenceClient
from pipeline.control import ControlPublisher, ControlView
from pipeline.modelstore import render_registry
from pipeline.registry import ModelEntry, Registry
from pipeline.rollout import buckets
from pipeline.settings import Settings
from schemas import InferenceResponse
from tests.integration.conftest import read_topic
from tests.integration.fleet_models import DigitsFiles, build_digits_versions, entry

# Quick judgements: a window of 30 samples per arm and step, every stable request
# mirrored to the candidate. Two digits models trained with different seeds agree
# on about 97.5% of the held-out digits, hence the lower agreement floor; latency is
# judged loosely, since this machine is shared.
FAST = {"window": 30, "shadow_percent": 100.0, "min_agreement": 0.85, "max_p99_ratio": 10.0}
# Never judged within a test: the traffic split alone is under test.
NEVER = {"window": 1_000_000, "shadow_percent": 0.0}


@dataclass
class Fleet:
    """The shared pipeline of this module."""

    settings: Settings
    bootstrap: str
    proc: ServeProcess
    digits: DigitsFiles
    view: ControlView
    client: InferenceClient


def write_registry(path: Path, entries: list[ModelEntry]) -> Path:
    """A registry file at ``path`` holding ``entries``."""
    path.write_text(render_registry(entries, path.parent), encoding="utf-8")
    Registry.load(path)  # what the processes will read must be valid
    return path


@pytest.fixture(scope="module")
async def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsFiles:
    """Digits versions 1, 2 and 3 in a model dir of this module."""
    return await asyncio.to_thread(build_digits_versions, tmp_path_factory.mktemp("fleet-models"))


@pytest.fixture(scope="module")
async def fleet(
    settings: Settings, broker: str, digits: DigitsFiles, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    """Router, worker and controller in one process, ready to answer."""
    f = digits.files
    registry = write_registry(tmp_path_factory.mktemp("fleet-registry") / "registry.toml", [
        entry("canary", f, ["1", "2"], **FAST),
        entry("bad", f, ["1", "3"], **FAST),
        entry("shadow", f, ["1", "3"], **FAST),
        entry("split", f, ["1", "2"], **NEVER),
        entry("manual", f, ["1", "2"], **NEVER),
        entry("gated", f, ["1"], pool="late"),
    ])
    s = settings.model_copy(update={
        "topic_prefix": f"fleet-{uuid.uuid4().hex[:8]}",
        "registry": registry,
        "state_dir": tmp_path_factory.mktemp("fleet-state"),
        "rollout_sample_percent": 100.0,
        "controller_interval_ms": 200,
        "rollout_step_min_ms": 0,
        "control_heartbeat_ms": 500,
        "control_expiry_ms": 3000,
    })
    proc = ServeProcess(s.model_copy(update={"metrics_port": free_port()}), broker, "all",
                        worker_id="fleet")
    await proc.start()
    try:
        async with ControlView(s, broker) as view, \
                InferenceClient(s, bootstrap_servers=broker) as client:
            for model in ("canary", "bad", "shadow", "split", "manual"):
                resp = await client.wait_until_served(model, {"input": digits.x[:1]})
                assert resp.status == "ok", proc.tail()
            yield Fleet(s, broker, proc, digits, view, client)
    finally:
        code = await proc.stop()
    assert code == 0, proc.tail()


def _request(model: str, row: np.ndarray[Any, Any], rid: str) -> dict[str, Any]:
    return {"id": rid, "model": model, "inputs": [
        {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]}


async def _traffic(fleet: Fleet, model: str, n: int, *, client: InferenceClient | None = None,
                   ids: list[str] | None = None) -> list[InferenceResponse]:
    x = fleet.digits.x
    tag = uuid.uuid4().hex[:8]
    ids = ids or [f"{model}-{tag}-{i}" for i in range(n)]
    return await (client or fleet.client).infer_many(
        [_request(model, x[i % len(x)], rid) for i, rid in enumerate(ids)],
        wait_timeout_ms=60_000,
    )


async def _drive(fleet: Fleet, model: str, until: Callable[[ControlView], bool],
                 timeout_s: float = 120) -> None:
    """Send traffic to ``model`` in bursts until ``until(view)`` holds."""
    deadline = time.monotonic() + timeout_s
    while not until(fleet.view):
        assert time.monotonic() < deadline, (
            f"{model}: condition not met; deployment {fleet.view.deployment(model)}\n"
            f"{fleet.proc.tail(60)}")
        responses = await _traffic(fleet, model, 40)
        assert all(r.status == "ok" for r in responses), responses[0]


async def _start(fleet: Fleet, model: str, version: str, **kw: Any) -> None:
    """Start a rollout the way `inferline rollout start` does, in-process."""
    entry_ = Registry.load(fleet.settings.registry_path).entries[model]
    async with ControlPublisher(fleet.settings, fleet.bootstrap) as pub:
        before = deploy.current(entry_, fleet.view)
        after = deploy.start(entry_, before, version=version, by="test", **kw)
        await deploy.publish_transition(pub, fleet.view, before, after, "start")


def _labels(r: InferenceResponse) -> list[int]:
    return [int(v) for v in {o.name: o for o in r.outputs}["label"].data]


async def _cli(fleet: Fleet, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERLINE_")}
    env.update(fleet.settings.to_env())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents.cli", "rollout", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "pool"))): s.value
        for fam in text_string_to_metric_families(body) for s in fam.samples
    }


async def _metric(fleet: Fleet, name: str, **labels: str) -> float:
    samples = await asyncio.to_thread(_scrape, fleet.proc.settings.metrics_port)
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- the traffic split ----------------------------------------------------------------


async def test_canary_split_follows_the_request_id_hash(fleet: Fleet) -> None:
    await _start(fleet, "split", "2", canary_percent=30)
    # Wait until the router has the deployment: an id in the canary share comes back v2.
    probe = next(f"probe-{i}" for i in range(1000) if buckets(f"probe-{i}")[0] < 3000)
    deadline = time.monotonic() + 30
    while (await fleet.client.infer("split", {"input": fleet.digits.x[:1]}, id=probe)).version \
            != "2":
        assert time.monotonic() < deadline, "the router never routed to the candidate"
        probe = next(f"{probe}-{i}" for i in range(1000) if buckets(f"{probe}-{i}")[0] < 3000)
    n = 1000
    responses = await _traffic(fleet, "split", n)
    got = {r.id: r.version for r in responses}
    # Every request went exactly where the hash of its id says ...
    assert all(v == ("2" if buckets(rid)[0] < 3000 else "1") for rid, v in got.items())
    # ... and the share is the canary percentage within binomial tolerance (5 sigma).
    share = sum(v == "2" for v in got.values()) / n
    assert abs(share - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5, share
    # The same ids again land on the same versions: a retry keeps its arm.
    again = await _traffic(fleet, "split", n, ids=list(got))
    assert {r.id: r.version for r in again} == got
    assert await _metric(fleet, "inferline_routed_version_total", model="split", version="2",
                         arm="candidate") >= sum(v == "2" for v in got.values())


# -- the controller -------------------------------------------------------------------


async def test_bad_candidate_is_rolled_back_automatically(fleet: Fleet) -> None:
    await _start(fleet, "bad", "3", canary_percent=5)

    def ended(v: ControlView) -> bool:
        d = v.deployment("bad")
        return d is not None and d.state == "rolled_back"

    await _drive(fleet, "bad", ended)
    dep = fleet.view.deployment("bad")
    assert dep is not None and dep.stable == "1" and dep.canary_percent == 0
    rollback = fleet.view.decisions("bad")[-1]
    assert rollback.action == "rollback" and rollback.by.startswith("controller")
    assert "label agreement 0.0000" in rollback.reason, rollback.reason
    assert rollback.figures is not None and rollback.figures.pairs >= 30
    assert rollback.figures.agreement == 0.0
    # Once the router has the new state, nothing more goes to version 3.
    await asyncio.sleep(1)
    responses = await _traffic(fleet, "bad", 100)
    assert {r.version for r in responses} == {"1"}
    assert "decision bad:" in fleet.proc.log_path.read_text(errors="replace")


async def test_cli_drives_a_good_canary_to_promotion(fleet: Fleet) -> None:
    code, out, err = await _cli(fleet, "start", "canary", "--version", "2", "--percent", "5")
    assert code == 0, err
    assert "canary: start" in out and "canary 5%" in out and "shadow 100%" in out

    waiting = asyncio.create_task(_cli(fleet, "status", "canary", "--wait", "promoted",
                                       "--timeout", "150", "--json"))

    def ended(v: ControlView) -> bool:
        d = v.deployment("canary")
        return d is not None and d.state in ("promoted", "rolled_back")

    await _drive(fleet, "canary", lambda v: ended(v) or waiting.done(), timeout_s=150)
    code, out, err = await waiting
    assert code == 0, (out, err)
    report = json.loads(out)
    assert report["deployment"]["state"] == "promoted"
    assert report["deployment"]["stable"] == "2"
    assert report["warm_workers"] == {"1": ["fleet"], "2": ["fleet"]}
    steps = [(d["action"], d["from_percent"], d["to_percent"]) for d in report["decisions"]]
    # Through every step of the registry's policy: 5 -> 25 -> 50 -> 100.
    assert steps == [("start", 0, 5), ("step", 5, 25), ("step", 25, 50), ("promote", 50, 100)]
    for d in report["decisions"][1:]:
        assert d["figures"]["agreement"] >= 0.85 and d["figures"]["pairs"] >= 30, d
        assert d["figures"]["candidate_error_rate"] == 0.0
    # The promoted version now serves everything.
    await asyncio.sleep(1)
    assert {r.version for r in await _traffic(fleet, "canary", 60)} == {"2"}

    code, out, _ = await _cli(fleet, "status", "canary")
    assert code == 0 and "state promoted, stable 2" in out and "decision 4: promote" in out


async def test_cli_promote_and_abort_by_hand(fleet: Fleet) -> None:
    code, out, err = await _cli(fleet, "promote", "manual")
    assert code == 2 and "no rollout of manual is in progress" in err
    code, out, err = await _cli(fleet, "start", "manual", "--version", "2", "--percent", "20",
                                "--shadow", "0")
    assert code == 0, err
    code, out, err = await _cli(fleet, "start", "manual", "--version", "2", "--percent", "30")
    assert code == 2 and "in progress" in err
    code, out, err = await _cli(fleet, "promote", "manual")
    assert code == 0 and "promote" in out and "stable 2" in out, (out, err)
    code, out, err = await _cli(fleet, "start", "manual", "--version", "1", "--shadow", "50")
    assert code == 0 and "state shadow" in out, err
    code, out, err = await _cli(fleet, "abort", "manual")
    assert code == 0 and "state aborted" in out, err
    assert await fleet.view.wait_for(
        lambda v: (d := v.deployment("manual")) is not None and d.state == "aborted", 30)
    dep = fleet.view.deployment("manual")
    assert dep is not None and dep.stable == "2" and not dep.active
    assert [d.action for d in fleet.view.decisions("manual")] == [
        "start", "promote", "start", "abort"]
    await asyncio.sleep(1)
    assert {r.version for r in await _traffic(fleet, "manual", 40)} == {"2"}


# -- shadow -----------------------------------------------------------------------------


async def test_shadow_results_never_reach_the_client(fleet: Fleet) -> None:
    await _start(fleet, "shadow", "3", shadow_percent=100)
    await asyncio.sleep(1)  # the router picks the deployment up from the control topic
    n = 60
    async with InferenceClient(fleet.settings, bootstrap_servers=fleet.bootstrap) as client:
        responses = await _traffic(fleet, "shadow", n, client=client)
        ids = {r.id for r in responses}
        assert {r.version for r in responses} == {"1"}
        expected = [int(v) for v in fleet.digits.y[:n]]
        agree = np.mean([_labels(r)[0] == e for r, e in zip(responses, expected, strict=True)])
        assert agree > 0.9  # version 1's answers, not the shifted labels of version 3
        # The candidate answered the mirrored copies, on the rollout topic ...
        deadline = time.monotonic() + 30
        while True:
            copies = [r for r in await read_topic(fleet.bootstrap,
                                                  fleet.settings.topic("rollout"), idle_ms=300)
                      if r.key is not None and r.key.decode() in ids]
            shadow = {InferenceResponse.model_validate_json(r.value).version for r in copies}
            if "3" in shadow or time.monotonic() > deadline:
                break
        answered = [InferenceResponse.model_validate_json(r.value) for r in copies]
        assert len({r.id for r in answered if r.version == "3"}) >= 30
        # ... and the client's reply topic holds exactly one answer per request, all stable.
        mine = await read_topic(fleet.bootstrap, client.reply_topic, idle_ms=500)
        assert len(mine) == n
        assert {InferenceResponse.model_validate_json(r.value).version for r in mine} == {"1"}
        assert client.unmatched == 0 and client.duplicates == 0

    def ended(v: ControlView) -> bool:
        d = v.deployment("shadow")
        return d is not None and d.state == "rolled_back"

    await _drive(fleet, "shadow", ended)
    last = fleet.view.decisions("shadow")[-1]
    assert last.action == "rollback" and "agreement" in last.reason


# -- pools and warm-up gating ---------------------------------------------------------


async def _committed(bootstrap: str, group: str, topics: list[str], partitions: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        return sum([(await consumer.committed(tp)) or 0 for tp in tps])
    finally:
        await consumer.stop()


async def test_pool_worker_gating_hold_then_served_when_warm(fleet: Fleet) -> None:
    s = fleet.settings
    # No worker of pool "late" yet: the router holds gated's requests in their lane.
    assert await _metric(fleet, "inferline_warm_workers", model="gated", version="1") == 0
    futures = [await fleet.client.submit(_request("gated", fleet.digits.x[i], f"g-{i}"))
               for i in range(5)]
    deadline = time.monotonic() + 30
    while await _metric(fleet, "inferline_routed_cold_total", model="gated", version="1",
                        action="held") < 5:
        assert time.monotonic() < deadline, fleet.proc.tail()
        await asyncio.sleep(0.2)
    log = fleet.proc.log_path.read_text(errors="replace")
    assert "gating: gated:1 has no warm worker; forwarding its requests to the lane" in log
    assert not any(f.done() for f in futures)

    late = ServeProcess(s, fleet.bootstrap, "worker", worker_id="late",
                        extra_args=["--pool", "late"])
    await late.start()
    try:
        responses = await asyncio.wait_for(asyncio.gather(*futures), 120)
        assert [(r.status, r.version, r.worker) for r in responses] == [("ok", "1", "late")] * 5
        ready = next(w for w in fleet.view.workers() if w.worker_id == "late")
        assert ready.pool == "late"
        assert [(v.model, v.version, v.warm, v.execution_provider) for v in ready.versions] == [
            ("gated", "1", True, "CPUExecutionProvider")]
        assert ready.versions[0].warmup_ms > 0
        main = next(w for w in fleet.view.workers() if w.worker_id == "fleet")
        assert main.pool == "default" and "gated" not in {v.model for v in main.versions}
        assert await _metric(fleet, "inferline_warm_workers", model="gated", version="1") == 1
        assert "gating: gated:1 is warm on late" in fleet.proc.log_path.read_text(
            errors="replace")
        # The pool's workers form their own group; the default pool's never took its lanes.
        lanes = [s.lane_topic("gated", p) for p in ("high", "normal", "batch")]
        deadline = time.monotonic() + 30
        while await _committed(fleet.bootstrap, s.group_id("worker-late"), lanes,
                               s.partitions) < 5:
            assert time.monotonic() < deadline, late.tail()
            await asyncio.sleep(0.3)
        assert await _committed(fleet.bootstrap, s.group_id("worker"), lanes, s.partitions) == 0
    finally:
        assert await late.stop() == 0, late.tail()
    assert await fleet.view.wait_for(
        lambda v: any(w.worker_id == "late" and w.state == "stopping"
                      for w in v.workers(include_gone=True)), 30)
    assert fleet.view.warm_workers("gated", "1") == []


async def test_cold_policy_stable_routes_to_the_stable_version_until_the_candidate_is_warm(
    settings: Settings, broker: str, digits: DigitsFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    f = digits.files
    base = tmp_path_factory.mktemp("cold-policy")
    full = write_registry(base / "full.toml", [entry("g2", f, ["1", "2"], **NEVER)])
    old = write_registry(base / "old.toml", [entry("g2", f, ["1"], **NEVER)])
    s = settings.model_copy(update={
        "topic_prefix": f"cold-{uuid.uuid4().hex[:8]}", "registry": full,
        "state_dir": base / "state", "cold_policy": "stable", "metrics_port": free_port(),
        "control_heartbeat_ms": 500, "control_expiry_ms": 3000,
    })
    router = ServeProcess(s, broker, "router", worker_id="cold-router")
    # The old worker's registry knows version 1 only: version 2 is warm nowhere.
    old_worker = ServeProcess(s.model_copy(update={"registry": old, "metrics_port": 0}), broker,
                              "worker", worker_id="old")
    new_worker = ServeProcess(s.model_copy(update={"metrics_port": 0}), broker, "worker",
                              worker_id="new")
    await router.start()
    await old_worker.start()
    try:
        async with ControlView(s, broker) as view, \
                InferenceClient(s, bootstrap_servers=broker) as client:
            await client.wait_until_served("g2", {"input": digits.x[:1]})
            entry_ = Registry.load(full).entries["g2"]
            async with ControlPublisher(s, broker) as pub:
                before = deploy.current(entry_, view)
                after = deploy.start(entry_, before, version="2", canary_percent=50, by="test")
                await deploy.publish_transition(pub, view, before, after, "start")
            await asyncio.sleep(1)
            ids = [f"c-{i}" for i in range(80)]
            x = digits.x
            first = await client.infer_many(
                [_request("g2", x[i], rid) for i, rid in enumerate(ids)])
            # Half of them belonged to the cold candidate: all went to stable instead.
            assert {(r.status, r.version, r.worker) for r in first} == {("ok", "1", "old")}
            canary_ids = [rid for rid in ids if buckets(rid)[0] < 5000]
            samples = await asyncio.to_thread(_scrape, s.metrics_port)
            assert samples[("inferline_routed_cold_total", (
                ("action", "rerouted"), ("model", "g2"), ("version", "2")))] == len(canary_ids)
            assert "gating: g2:2 has no warm worker; routing its requests to stable g2:1" in (
                router.log_path.read_text(errors="replace"))

            # A worker with version 2 warm replaces the old one: the canary share flows.
            assert await old_worker.stop() == 0
            await new_worker.start()
            assert await view.wait_for(lambda v: v.warm_workers("g2", "2") == ["new"], 120), (
                new_worker.tail())
            await asyncio.sleep(1)
            again = await client.infer_many(
                [_request("g2", x[i], f"{rid}-b") for i, rid in enumerate(ids)])
            got = {r.id: r.version for r in again}
            assert got == {f"{rid}-b": "2" if buckets(f"{rid}-b")[0] < 5000 else "1"
                           for rid in ids}
            assert "gating: g2:2 is warm on new" in router.log_path.read_text(errors="replace")
    finally:
        codes = [await p.stop() for p in (router, old_worker, new_worker)]
    assert codes == [0, 0, 0], (codes, router.tail(), new_worker.tail())


async def test_worker_refuses_a_model_whose_sha256_does_not_match(
    settings: Settings, broker: str, digits: DigitsFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = tmp_path_factory.mktemp("sha")
    good = entry("tampered", digits.files, ["1"])
    wrong = "0" * 64
    bad = good.model_copy(update={"versions": (good.versions[0].model_copy(
        update={"sha256": wrong}),)})
    registry = write_registry(base / "registry.toml", [bad])
    s = settings.model_copy(update={
        "topic_prefix": f"sha-{uuid.uuid4().hex[:8]}", "registry": registry,
        "state_dir": base / "state",
    })
    worker = ServeProcess(s, broker, "worker", worker_id="tampered")
    await worker.start()
    assert worker.proc is not None
    code = await asyncio.wait_for(worker.proc.wait(), 120)
    log = worker.log_path.read_text(errors="replace")
    assert code == 2, log
    assert f"model tampered:1 file '{digits.files['1']}' has sha256 " in log
    assert f"but the registry expects {wrong}" in log
    # Refused before it could say it was ready.
    async with ControlView(s, broker) as view:
        assert view.workers(include_gone=True) == []
