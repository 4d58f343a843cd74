"""Rollout transitions: start, step, promote, roll back, abort."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import deploy
from pipeline.control import DeploymentState
from pipeline.errors import RolloutError
from pipeline.registry import ModelEntry, ModelVersion, RolloutPolicy, TensorSpec
from pipeline.rollout import Figures


def _entry(*versions: str) -> ModelEntry:
    vs = tuple(
        ModelVersion(name="m", version=v, path=Path(f"{v}.onnx"),
                     inputs=(TensorSpec(name="x", datatype="FP32", shape=(-1, 2)),),
                     outputs=(TensorSpec(name="y", datatype="INT64", shape=(-1,)),))
        for v in versions
    )
    return ModelEntry(name="m", default_version=versions[0], versions=vs,
                      rollout=RolloutPolicy(shadow_percent=20))


def _stable() -> DeploymentState:
    return DeploymentState(model="m", stable="1")


def test_start_a_canary_with_the_policy_shadow_share() -> None:
    d = deploy.start(_entry("1", "2"), _stable(), version="2", canary_percent=5, by="t")
    assert (d.state, d.stable, d.candidate, d.canary_percent, d.shadow_percent) == (
        "canary", "1", "2", 5, 20)
    assert d.active and d.rollout_id and d.updated_by == "t"
    shadow = deploy.start(_entry("1", "2"), _stable(), version="2", shadow_percent=50, by="t")
    assert (shadow.state, shadow.canary_percent, shadow.shadow_percent) == ("shadow", 0, 50)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": "9", "canary_percent": 5}, "no version '9'"),
        ({"version": "1", "canary_percent": 5}, "already the stable one"),
        ({"version": "2", "canary_percent": 100}, "rollout promote"),
        ({"version": "2", "canary_percent": 0, "shadow_percent": 0}, "--percent"),
    ],
)
def test_start_refuses_what_makes_no_sense(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RolloutError, match=message):
        deploy.start(_entry("1", "2"), _stable(), by="t", **kwargs)  # type: ignore[arg-type]


def test_one_rollout_at_a_time() -> None:
    running = deploy.start(_entry("1", "2", "3"), _stable(), version="2", canary_percent=5,
                           by="t")
    with pytest.raises(RolloutError, match="in progress"):
        deploy.start(_entry("1", "2", "3"), running, version="3", canary_percent=5, by="t")


def test_steps_promotion_and_rollback() -> None:
    running = deploy.start(_entry("1", "2"), _stable(), version="2", canary_percent=5, by="t")
    f = Figures(pairs=10, agreement=1.0)
    step = deploy.advance(running, 25, reason="ok", figures=f, by="c")
    assert (step.state, step.canary_percent, step.figures) == ("canary", 25, f)
    assert step.step_started_ms >= running.step_started_ms
    done = deploy.advance(step, 100, reason="ok", figures=f, by="c")
    assert (done.state, done.stable, done.candidate, done.canary_percent) == (
        "promoted", "2", None, 0)
    assert not done.active
    back = deploy.stop(step, aborted=False, reason="bad", figures=f, by="c")
    assert (back.state, back.stable, back.candidate, back.canary_percent, back.active) == (
        "rolled_back", "1", "2", 0, False)
    assert deploy.stop(step, aborted=True, reason="x", figures=None, by="cli").state == "aborted"
    for finished in (done, back):
        with pytest.raises(RolloutError, match="no rollout"):
            deploy.promote(finished, reason="x", figures=None, by="cli")
        with pytest.raises(RolloutError, match="no rollout"):
            deploy.stop(finished, aborted=True, reason="x", figures=None, by="cli")
