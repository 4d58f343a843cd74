"""The ``inferline`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
import time
from collections.abc import Sequence

from pydantic import ValidationError

from agents import cli_batch, cli_observe, cli_ops, cli_rollout, cli_status
from pipeline.errors import InferlineError
from pipeline.settings import Settings

log = logging.getLogger("inferline.cli")


def _pool_arg(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise argparse.ArgumentTypeError(f"pool {value!r} must be 1-64 of A-Z a-z 0-9 . _ -")
    return value


def _models_arg(value: str | None) -> list[str] | None:
    return [m for m in value.split(",") if m] if value else None


def cmd_models_build(settings: Settings, args: argparse.Namespace) -> int:
    """Build the demo models into the model store."""
    from pipeline.modelstore import ensure_models

    started = time.perf_counter()
    reports = ensure_models(settings.model_dir, force=args.force)
    if not reports:
        print(f"models are up to date in {settings.model_dir}")
    for r in reports:
        print(f"built {r.model}:{r.version} -> {r.path} in {r.seconds:.1f}s; {r.summary}")
    if reports:
        print(f"build took {time.perf_counter() - started:.1f}s")
    print(f"registry: {settings.registry_path}")
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """Serve a role; with no bootstrap servers, under an embedded broker."""
    models = _models_arg(args.models)
    if args.pool:
        settings = settings.model_copy(update={"pool": args.pool})
    if settings.bootstrap_servers:
        from agents import serve

        serve.run(settings, settings.bootstrap_servers, args.role, models)
        return 0
    return asyncio.run(_serve_embedded(settings, args.role, models))


async def _serve_embedded(settings: Settings, role: str, models: list[str] | None) -> int:
    from agents.processes import ServeProcess
    from pipeline.broker import EmbeddedBroker
    from pipeline.tasks import cancel_and_wait

    async with EmbeddedBroker(threads=settings.embedded_broker_threads) as broker:
        print(f"embedded broker at {broker.bootstrap_servers}; producers may write to "
              f"{settings.topic('requests')}", flush=True)
        child = ServeProcess(settings, broker.bootstrap_servers, role, models=models)
        await child.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        assert child.proc is not None
        waiter = asyncio.create_task(child.proc.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        await cancel_and_wait(stopper)
        code = await child.stop()
        await cancel_and_wait(waiter)
        return code or 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """The whole pipeline on a laptop: see agents/demo.py."""
    from agents.demo import DemoOptions, run_demo

    opts = DemoOptions(
        requests=args.requests, burst=args.burst, malformed=args.malformed, rate=args.rate
    )
    return asyncio.run(run_demo(settings, opts))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``inferline``."""
    p = argparse.ArgumentParser(prog="inferline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on an embedded broker")
    demo.add_argument("--requests", type=int, default=3000, help="steady requests (default 3000)")
    demo.add_argument("--burst", type=int, default=1000, help="requests sent at once")
    demo.add_argument("--malformed", type=int, default=30, help="malformed records")
    demo.add_argument("--rate", type=float, default=1500.0, help="steady requests per second")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="run a router, a worker, or both")
    serve.add_argument("--role", choices=["router", "worker", "all", "stats", "controller"],
                       default="all")
    serve.add_argument("--models", help="comma-separated models a worker serves (default all)")
    serve.add_argument("--pool", type=_pool_arg,
                       help="worker pool: serve only its models (default INFERLINE_POOL)")
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="model store")
    msub = models.add_subparsers(dest="models_command", required=True)
    build = msub.add_parser("build", help="build the demo models")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(func=cmd_models_build)
    cli_batch.register(sub)
    cli_rollout.register(sub)
    cli_ops.register(sub)
    cli_status.register(sub)
    cli_observe.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``inferline`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            name = "INFERLINE_" + "_".join(str(p) for p in err["loc"]).upper()
            print(f"inferline: {name}={err.get('input')!r}: {err['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The Kafka client's INFO lines (subscriptions, group joins) drown the CLI's own.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return int(args.func(settings, args) or 0)
    except InferlineError as exc:
        print(f"inferline: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
