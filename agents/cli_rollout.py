"""``inferline rollout``: start, watch, promote and abort canary and shadow rollouts.

Each command reads the control topic (deployment state, worker readiness and
decisions) and, for the changing ones, writes a decision and the new deployment
state there; routers pick it up within a fetch, the controller judges from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from pipeline.control import Action, ControlPublisher, ControlView, DeploymentState
from pipeline.errors import RolloutError
from pipeline.registry import ModelEntry, Registry
from pipeline.settings import Settings

_TERMINAL = ("promoted", "rolled_back", "aborted")
# Who the decisions of this command are signed by.
_BY = "cli"


def _percent(value: str) -> float:
    try:
        p = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a percentage") from None
    if not 0 <= p <= 100:
        raise argparse.ArgumentTypeError(f"{p:g} is not within 0..100")
    return p


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``rollout start|status|promote|abort`` to the ``inferline`` parser."""
    rollout = sub.add_parser("rollout", help="canary and shadow rollouts of model versions")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True)

    start = rsub.add_parser(
        "start", help="send a share of MODEL's traffic to a new version",
        description="--percent P sends P%% of the requests that name no version to VERSION "
        "(by a hash of the request id); the controller then steps it up through the registry's "
        "rollout steps or rolls it back. --shadow S mirrors S%% of the stable traffic to VERSION "
        "and compares the answers without clients seeing them; with --percent it defaults to "
        "the registry's rollout.shadow_percent.",
    )
    start.add_argument("model")
    start.add_argument("--version", required=True, help="the candidate version")
    start.add_argument("--percent", type=_percent, default=0.0, help="canary percentage")
    start.add_argument("--shadow", type=_percent, default=None, help="shadow percentage")
    start.set_defaults(func=cmd_start)

    status = rsub.add_parser("status", help="deployment, warm workers and decisions of MODEL")
    status.add_argument("model")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--wait", choices=[*_TERMINAL, "done"], default=None,
                        help="wait until the rollout ends; exit 1 unless it ends this way "
                        "('done': any end)")
    status.add_argument("--timeout", type=float, default=600.0,
                        help="seconds --wait waits (default 600)")
    status.set_defaults(func=cmd_status)

    promote = rsub.add_parser("promote", help="make the candidate the stable version now")
    promote.add_argument("model")
    promote.set_defaults(func=cmd_promote)

    abort = rsub.add_parser("abort", help="send all traffic back to the stable version now")
    abort.add_argument("model")
    abort.set_defaults(func=cmd_abort)


def _entry(settings: Settings, model: str) -> ModelEntry:
    registry = Registry.load(settings.registry_path)
    entry = registry.entries.get(model)
    if entry is None:
        raise RolloutError(f"model {model!r} is not in registry {str(settings.registry_path)!r} "
                           f"(known: {registry.names()})", model=model)
    return entry


def _bootstrap(settings: Settings) -> str:
    if not settings.bootstrap_servers:
        raise RolloutError("rollout commands talk to a running pipeline: set "
                           "INFERLINE_BOOTSTRAP_SERVERS to its Kafka cluster")
    return settings.bootstrap_servers


async def _change(
    settings: Settings, model: str, action: Action, args: argparse.Namespace
) -> int:
    from pipeline import deploy

    entry = _entry(settings, model)
    bootstrap = _bootstrap(settings)
    async with ControlView(settings, bootstrap) as view, \
            ControlPublisher(settings, bootstrap) as publisher:
        before = deploy.current(entry, view)
        if action == "start":
            after = deploy.start(entry, before, version=args.version,
                                 canary_percent=args.percent, shadow_percent=args.shadow,
                                 by=_BY)
        elif action == "promote":
            after = deploy.promote(before, reason=f"promoted by {_BY}",
                                   figures=before.figures, by=_BY)
        else:
            after = deploy.stop(before, aborted=True, reason=f"aborted by {_BY}",
                                figures=before.figures, by=_BY)
        decision = await deploy.publish_transition(publisher, view, before, after, action)
    print(f"{model}: {decision.action} (decision {decision.seq}): {_line(after)}")
    warm = view.warm_workers(model, args.version) if action == "start" else None
    if warm == []:
        print(f"note: no live worker has {model}:{args.version} warm yet; routers follow "
              f"INFERLINE_COLD_POLICY until one does", file=sys.stderr)
    return 0


def _line(d: DeploymentState) -> str:
    parts = [f"state {d.state}", f"stable {d.stable}"]
    if d.candidate is not None and d.state not in ("promoted",):
        parts.append(f"candidate {d.candidate}")
    if d.active:
        parts.append(f"canary {d.canary_percent:g}%")
        parts.append(f"shadow {d.shadow_percent:g}%")
    if d.rollout_id:
        parts.append(f"rollout {d.rollout_id}")
    return ", ".join(parts)


def cmd_start(settings: Settings, args: argparse.Namespace) -> int:
    """``rollout start MODEL --version V (--percent P | --shadow S)``."""
    return asyncio.run(_change(settings, args.model, "start", args))


def cmd_promote(settings: Settings, args: argparse.Namespace) -> int:
    """``rollout promote MODEL``."""
    return asyncio.run(_change(settings, args.model, "promote", args))


def cmd_abort(settings: Settings, args: argparse.Namespace) -> int:
    """``rollout abort MODEL``."""
    return asyncio.run(_change(settings, args.model, "abort", args))


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """``rollout status MODEL [--json] [--wait STATE]``."""
    return asyncio.run(_status(settings, args))


async def _status(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline import deploy

    entry = _entry(settings, args.model)
    async with ControlView(settings, _bootstrap(settings)) as view:
        code = 0
        if args.wait is not None:
            ended = await view.wait_for(
                lambda v: deploy.current(entry, v).state in _TERMINAL, args.timeout
            )
            state = deploy.current(entry, view).state
            code = 0 if ended and args.wait in (state, "done") else 1
        report = _report(entry, view)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return code


def _report(entry: ModelEntry, view: ControlView) -> dict[str, Any]:
    from pipeline import deploy

    dep = deploy.current(entry, view)
    return {
        "deployment": dep.model_dump(mode="json"),
        "warm_workers": {
            v.version: view.warm_workers(entry.name, v.version) for v in entry.versions
        },
        "decisions": [d.model_dump(mode="json") for d in view.decisions(entry.name)],
    }


def _print(report: dict[str, Any]) -> None:
    d = DeploymentState.model_validate(report["deployment"])
    print(f"{d.model}: {_line(d)}")
    if d.reason:
        print(f"  reason: {d.reason}")
    for version, workers in report["warm_workers"].items():
        print(f"  version {version}: warm on {len(workers)} worker(s) {', '.join(workers)}")
    for dec in report["decisions"][-10:]:
        print(f"  decision {dec['seq']}: {dec['action']} {dec['from_percent']:g}% -> "
              f"{dec['to_percent']:g}% by {dec['by']}: {dec['reason']}")

