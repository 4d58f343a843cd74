"""``inferline topics create`` and ``inferline pools [set]``: cluster and model store set up.

Deployments (docker-compose, Kubernetes) run these once before the long-lived
roles: the topic names and the pool assignments then come from the same code
the router and workers use, not from a copy in a shell script.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import tempfile

from pipeline.errors import InferlineError, RegistryError
from pipeline.modelstore import render_registry
from pipeline.registry import ModelEntry, ModelVersion, Registry
from pipeline.settings import Settings
from pipeline.topics import fixed_topics, lane_topics

_POOL = re.compile(r"[A-Za-z0-9._-]{1,64}")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``topics create`` and ``pools [set]`` to the ``inferline`` parser."""
    topics = sub.add_parser("topics", help="the pipeline's Kafka topics")
    tsub = topics.add_subparsers(dest="topics_command", required=True)
    create = tsub.add_parser(
        "create",
        help="create the fixed topics and the lanes of the registry's models",
        description="Waits for the cluster at INFERLINE_BOOTSTRAP_SERVERS, then creates the "
        "topics that are missing with INFERLINE_PARTITIONS partitions (the control topic "
        "compacted). Existing topics are left as they are.",
    )
    create.add_argument("--models", help="comma-separated models whose lanes to create "
                        "(default: every model in the registry)")
    create.set_defaults(func=cmd_topics_create)

    pools = sub.add_parser("pools", help="the worker pool of each model in the registry")
    pools.set_defaults(func=cmd_pools_show)
    psub = pools.add_subparsers(dest="pools_command")
    assign = psub.add_parser("set", help="move models to worker pools (rewrites the registry)")
    assign.add_argument("assignments", nargs="+", metavar="MODEL=POOL")
    assign.set_defaults(func=cmd_pools_set)


def cmd_topics_create(settings: Settings, args: argparse.Namespace) -> int:
    """Create the pipeline's topics on the configured cluster, waiting for it to answer."""
    from agents.serve import wait_for_broker

    bootstrap = settings.bootstrap_servers
    if not bootstrap:
        raise InferlineError("topics create needs a cluster: set INFERLINE_BOOTSTRAP_SERVERS")
    models = [m for m in (args.models or "").split(",") if m] or Registry.load(
        settings.registry_path
    ).names()
    asyncio.run(wait_for_broker(settings, bootstrap, models))
    for name in [*fixed_topics(settings), *lane_topics(settings, models)]:
        print(name)
    print(f"topics ready on {bootstrap} for models {', '.join(models)}")
    return 0


def cmd_pools_show(settings: Settings, args: argparse.Namespace) -> int:
    """Print each pool, its models and its workers' consumer group."""
    registry = Registry.load(settings.registry_path)
    for pool, models in registry.pools().items():
        group = settings.model_copy(update={"pool": pool}).worker_group_id()
        print(f"{pool}\t{','.join(models)}\t{group}")
    return 0


def cmd_pools_set(settings: Settings, args: argparse.Namespace) -> int:
    """Assign pools to models in the registry file, then print the pools."""
    path = settings.registry_path
    registry = Registry.load(path)
    wanted = parse_assignments(args.assignments)
    write_pools(registry, wanted)
    print(f"registry: {path}")
    return cmd_pools_show(settings, args)


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``MODEL=POOL`` arguments as a mapping; RegistryError names a malformed one."""
    out: dict[str, str] = {}
    for item in items:
        model, sep, pool = item.partition("=")
        if not sep or not model or not _POOL.fullmatch(pool):
            raise RegistryError(
                f"{item!r} is not MODEL=POOL (a pool is 1-64 of A-Z a-z 0-9 . _ -)", value=item
            )
        out[model] = pool
    return out


def write_pools(registry: Registry, pools: dict[str, str]) -> Registry:
    """Rewrite ``registry``'s file with ``pools`` (model -> pool) applied; returns it reloaded."""
    if registry.source is None:
        raise RegistryError("the registry was not loaded from a file")
    unknown = sorted(set(pools) - set(registry.entries))
    if unknown:
        raise RegistryError(
            f"models {unknown} are not in registry {str(registry.source)!r} "
            f"(known: {registry.names()})",
            models=unknown,
        )
    entries = [
        _with_pool(entry, pools[name]) if name in pools else entry
        for name, entry in registry.entries.items()
    ]
    path = registry.source
    text = render_registry(entries, path.parent)
    # Write beside it and rename, so that a reader never sees half a registry.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".registry-", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return Registry.load(path)


def _with_pool(entry: ModelEntry, pool: str) -> ModelEntry:
    versions = tuple(
        ModelVersion.model_validate({**v.model_dump(), "pool": pool}) for v in entry.versions
    )
    return entry.model_copy(update={"versions": versions})
