"""Deployment transitions: start, step, promote, roll back or abort a rollout.

The transitions are pure functions from one :class:`~pipeline.control.DeploymentState`
to the next; :func:`publish_transition` writes the decision record and then the
new state to the control topic. The command line and the canary controller both
go through here, so a rollout changes the same way whoever drives it.
"""

from __future__ import annotations

import logging
import uuid

from pipeline.control import (
    Action,
    ControlPublisher,
    ControlView,
    Decision,
    DeploymentState,
    now_ms,
)
from pipeline.errors import RolloutError
from pipeline.registry import ModelEntry
from pipeline.rollout import Figures

log = logging.getLogger("inferline.deploy")


def current(entry: ModelEntry, view: ControlView) -> DeploymentState:
    """The model's deployment: its record, else its registry default as stable."""
    found = view.deployment(entry.name)
    return found if found is not None else DeploymentState(
        model=entry.name, stable=entry.default_version, updated_by="registry"
    )


def start(
    entry: ModelEntry,
    now: DeploymentState,
    *,
    version: str,
    canary_percent: float = 0.0,
    shadow_percent: float | None = None,
    by: str,
) -> DeploymentState:
    """A new rollout of ``version``: a canary of ``canary_percent``, or shadow only.

    A canary mirrors the policy's ``shadow_percent`` of the stable traffic unless
    ``shadow_percent`` is given. Raises :class:`RolloutError` when the version is not
    registered, is already stable, or another rollout is in progress.
    """
    versions = [v.version for v in entry.versions]
    if version not in versions:
        raise RolloutError(
            f"model {entry.name!r} has no version {version!r} in the registry (has {versions})",
            model=entry.name, version=version,
        )
    if now.active:
        raise RolloutError(
            f"a rollout of {entry.name} to version {now.candidate} is in progress "
            f"({now.state}, canary {now.canary_percent:g}%); promote or abort it first",
            model=entry.name,
        )
    if version == now.stable:
        raise RolloutError(f"version {version!r} of {entry.name} is already the stable one",
                           model=entry.name, version=version)
    if not 0 <= canary_percent < 100:
        raise RolloutError(
            f"canary percent {canary_percent:g} must be at least 0 and below 100 "
            "(100 is a promotion: use `rollout promote`)", percent=canary_percent,
        )
    shadow = entry.rollout.shadow_percent if shadow_percent is None else shadow_percent
    if not 0 <= shadow <= 100:
        raise RolloutError(f"shadow percent {shadow:g} must be within 0..100", percent=shadow)
    if canary_percent == 0 and shadow == 0:
        raise RolloutError("a rollout needs a canary percent (--percent) or a shadow percent "
                           "(--shadow) above 0")
    at = now_ms()
    return DeploymentState(
        model=entry.name, stable=now.stable, candidate=version,
        canary_percent=canary_percent, shadow_percent=shadow,
        state="canary" if canary_percent > 0 else "shadow",
        rollout_id=uuid.uuid4().hex[:12],
        reason=f"started by {by}", step_started_ms=at, updated_at_ms=at, updated_by=by,
    )


def advance(
    now: DeploymentState, to_percent: float, *, reason: str, figures: Figures | None, by: str
) -> DeploymentState:
    """The next canary step (a promotion when ``to_percent`` reaches 100)."""
    if to_percent >= 100:
        return promote(now, reason=reason, figures=figures, by=by)
    at = now_ms()
    return now.model_copy(update={
        "canary_percent": to_percent, "state": "canary", "reason": reason, "figures": figures,
        "step_started_ms": at, "updated_at_ms": at, "updated_by": by,
    })


def promote(
    now: DeploymentState, *, reason: str, figures: Figures | None, by: str
) -> DeploymentState:
    """The candidate becomes the stable version; all traffic goes to it."""
    if not now.active or now.candidate is None:
        raise RolloutError(f"no rollout of {now.model} is in progress ({now.state}); "
                           "nothing to promote", model=now.model)
    at = now_ms()
    return now.model_copy(update={
        "stable": now.candidate, "candidate": None, "canary_percent": 0.0,
        "shadow_percent": 0.0, "state": "promoted", "reason": reason, "figures": figures,
        "step_started_ms": at, "updated_at_ms": at, "updated_by": by,
    })


def stop(
    now: DeploymentState, *, aborted: bool, reason: str, figures: Figures | None, by: str
) -> DeploymentState:
    """All traffic back to the stable version: rolled back (judged) or aborted (by hand)."""
    if not now.active:
        raise RolloutError(f"no rollout of {now.model} is in progress ({now.state}); "
                           "nothing to abort", model=now.model)
    at = now_ms()
    return now.model_copy(update={
        "canary_percent": 0.0, "shadow_percent": 0.0,
        "state": "aborted" if aborted else "rolled_back", "reason": reason,
        "figures": figures, "step_started_ms": at, "updated_at_ms": at, "updated_by": by,
    })


async def publish_transition(
    publisher: ControlPublisher,
    view: ControlView,
    before: DeploymentState,
    after: DeploymentState,
    action: Action,
    *,
    seq: int | None = None,
) -> Decision:
    """Write the decision record, then the new deployment state; returns the decision."""
    decision = Decision(
        model=after.model, seq=seq or view.next_seq(after.model), action=action,
        stable=before.stable, candidate=before.candidate or after.candidate,
        from_percent=before.canary_percent,
        to_percent=100.0 if action == "promote" else after.canary_percent,
        rollout_id=after.rollout_id, reason=after.reason, figures=after.figures,
        by=after.updated_by, at_ms=after.updated_at_ms,
    )
    await publisher.publish(decision)
    await publisher.publish(after)
    log.info("rollout %s %s: %s (%s -> %s, %g%% -> %g%%): %s", after.model, after.rollout_id,
             action, decision.stable, decision.candidate, decision.from_percent,
             decision.to_percent, after.reason)
    return decision
