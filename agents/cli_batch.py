"""``inferline batch run|status``: batch jobs on the serving fleet (see pipeline/batchjob.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipeline.batchio import check_job_id, default_job_id, file_format, read_records
from pipeline.batchjob import (
    BatchJob,
    BatchJobConfig,
    JobStatus,
    job_client,
    load_status,
    state_file,
)
from pipeline.client import InferenceClient
from pipeline.errors import InvalidRequest, RegistryError, UnknownModel
from pipeline.registry import ModelVersion, Registry
from pipeline.session import representative_input
from pipeline.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``batch run`` and ``batch status`` to the ``inferline`` parser."""
    batch = sub.add_parser("batch", help="run a file of requests through the batch lane")
    bsub = batch.add_subparsers(dest="batch_command", required=True)

    run = bsub.add_parser(
        "run", help="send every row of INPUT, write the results to OUTPUT in input order",
        description="INPUT and OUTPUT are JSON Lines (.jsonl) or Parquet (.parquet). A row is "
        '{"id": optional, "inputs": {name: value}}, {"id": optional, name: value, ...} or, '
        "for a model with one input, the bare value (64 numbers for digits, a text for "
        "minilm). A rerun skips the ids OUTPUT already holds. Exit status 1 if any row failed.",
    )
    run.add_argument("input", type=Path, metavar="INPUT")
    run.add_argument("--model", required=True, help="model name in the registry")
    run.add_argument("--version", default=None, help="model version (default: the registry's)")
    run.add_argument("--out", required=True, type=Path, metavar="OUTPUT",
                     help="results file; its extension picks the format")
    run.add_argument("--job-id", default=None,
                     help="job id (default: the one in OUTPUT, else derived from INPUT's path)")
    run.add_argument("--max-in-flight", type=int, default=512,
                     help="rows awaiting an answer at once (default 512)")
    run.add_argument("--rows-per-request", type=int, default=16,
                     help="consecutive rows of the same shape sent as one request, at most "
                     "the model's max_batch_size (default 16; 1 sends each row alone)")
    run.add_argument("--wait-timeout-s", type=float, default=600.0,
                     help="a row unanswered this long fails with CLIENT_TIMEOUT (default 600)")
    run.add_argument("--retry-failed", action="store_true",
                     help="send again the rows OUTPUT holds as failed")
    run.set_defaults(func=cmd_batch_run)

    status = bsub.add_parser("status", help="progress of a job")
    status.add_argument("job_id", metavar="JOB")
    status.add_argument("--json", action="store_true", help="print the status record as JSON")
    status.set_defaults(func=cmd_batch_status)


def cmd_batch_run(settings: Settings, args: argparse.Namespace) -> int:
    """Run a batch job; 0 if every row succeeded, 1 if any failed."""
    if not args.input.is_file():
        raise InvalidRequest(f"input file {str(args.input)!r} does not exist")
    file_format(args.input)
    file_format(args.out)
    if args.max_in_flight < 1:
        raise InvalidRequest(f"--max-in-flight must be at least 1, got {args.max_in_flight}")
    if args.rows_per_request < 1:
        raise InvalidRequest(
            f"--rows-per-request must be at least 1, got {args.rows_per_request}")
    job_id = check_job_id(args.job_id or _job_id_in(args.out) or
                          default_job_id(args.input, args.model))
    config = BatchJobConfig(
        job_id=job_id, model=args.model, version=args.version, input=args.input,
        output=args.out, max_in_flight=args.max_in_flight, wait_timeout_s=args.wait_timeout_s,
        retry_failed=args.retry_failed, rows_per_request=args.rows_per_request,
    )
    status = asyncio.run(_run(settings, config))
    _print_summary(status, settings)
    return 1 if status.failed or status.state != "completed" else 0


def _job_id_in(output: Path) -> str | None:
    """The job id recorded in an existing output, so a rerun resumes the same job."""
    if not output.exists() and not output.with_name(output.name + ".partial.jsonl").exists():
        return None
    records = read_records(output)
    return str(records[0]["job_id"]) if records and records[0].get("job_id") else None


def _spec(settings: Settings, model: str, version: str | None, *, required: bool
          ) -> ModelVersion | None:
    """The model version from the local registry; None when it does not know it."""
    try:
        return Registry.load(settings.registry_path).resolve(model, version)
    except (RegistryError, UnknownModel) as exc:
        if required:
            raise
        print(f"inferline: the local registry does not describe {model}: {exc}; "
              "input datatypes are taken from the values", file=sys.stderr)
        return None


async def _run(settings: Settings, config: BatchJobConfig) -> JobStatus:
    console = Console(stderr=True)
    async with _fleet(settings, config, console) as (bootstrap, spec):
        # The worker refuses a request of more rows than the model's max_batch_size;
        # with the model unknown here, rows go alone.
        config = dataclasses.replace(config, rows_per_request=min(
            config.rows_per_request, spec.max_batch_size if spec is not None else 1))
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
        )
        task = progress.add_task(config.job_id, total=None, detail="")

        def show(st: JobStatus) -> None:
            progress.update(task, total=st.total, completed=st.done, detail=(
                f"ok {st.ok} failed {st.failed} {st.throughput_rps:,.0f}/s "
                f"${st.cost_usd:.6f}"))

        async with job_client(settings, bootstrap, config) as client:
            job = BatchJob(settings, client, config,
                           specs={t.name: t for t in spec.inputs} if spec is not None else None,
                           on_progress=show)
            with progress:
                return await job.run()


@contextlib.asynccontextmanager
async def _fleet(
    settings: Settings, config: BatchJobConfig, console: Console
) -> AsyncIterator[tuple[str, ModelVersion | None]]:
    """The cluster in the settings, or an embedded broker with a router and a worker.

    Yields the bootstrap servers and the model version as the local registry has it.
    """
    if settings.bootstrap_servers:
        yield settings.bootstrap_servers, _spec(settings, config.model, config.version,
                                                required=False)
        return
    from agents.processes import ServeProcess
    from agents.serve import prepare_topics
    from pipeline.broker import EmbeddedBroker
    from pipeline.modelstore import BUILDERS, ensure_models

    if config.model in BUILDERS:
        await asyncio.to_thread(ensure_models, settings.model_dir, models=[config.model])
    spec = _spec(settings, config.model, config.version, required=True)
    assert spec is not None
    async with EmbeddedBroker(threads=settings.embedded_broker_threads) as broker:
        bootstrap = broker.bootstrap_servers
        console.print(f"no INFERLINE_BOOTSTRAP_SERVERS: embedded broker at {bootstrap} "
                      f"with a router and a worker for {config.model}")
        await prepare_topics(settings, bootstrap, [config.model])
        child = ServeProcess(settings, bootstrap, "all", models=[config.model],
                             worker_id=f"batch-{config.job_id}")
        await child.start()
        try:
            probe = {t.name: representative_input(t, 1) for t in spec.inputs}
            async with InferenceClient(settings, bootstrap_servers=bootstrap) as client:
                await client.wait_until_served(config.model, probe)
            yield bootstrap, spec
        finally:
            await child.stop()


def _print_summary(st: JobStatus, settings: Settings) -> None:
    new = st.done - st.skipped
    print(f"job {st.job_id} {st.state}: {st.done}/{st.total} rows, {st.ok} ok, "
          f"{st.failed} failed ({st.skipped} already in {st.output}, {new} now, "
          f"{st.sent} sent) in {st.elapsed_s:.1f}s: {st.throughput_rps:,.1f} rows/s; "
          f"cost ${st.cost_usd:.8f}")
    for key, n in st.counts.items():
        print(f"  {key:<32} {n:>10}")
    print(f"status: {state_file(settings, st.job_id)} and "
          f"{settings.topic('control')} key job:{st.job_id}")


def cmd_batch_status(settings: Settings, args: argparse.Namespace) -> int:
    """Print a job's progress from its state file (and the control topic when configured)."""
    check_job_id(args.job_id)
    st = asyncio.run(load_status(settings, args.job_id,
                                 bootstrap_servers=settings.bootstrap_servers))
    if st is None:
        where = str(state_file(settings, args.job_id))
        if settings.bootstrap_servers:
            where += f" or {settings.topic('control')}"
        raise InvalidRequest(f"no batch job {args.job_id!r} in {where}", job_id=args.job_id)
    if args.json:
        print(st.to_json().decode())
        return 0
    pct = 100 * st.done / st.total if st.total else 0.0
    age = time.time() - st.updated_at
    print(f"job {st.job_id}: {st.state}, model {st.model}"
          f"{':' + st.version if st.version else ''}")
    print(f"  rows      {st.done}/{st.total} done ({pct:.1f}%), {st.ok} ok, {st.failed} failed")
    print(f"  cost      ${st.cost_usd:.8f}")
    print(f"  rate      {st.throughput_rps:,.1f} rows/s over {st.elapsed_s:.1f}s")
    print(f"  files     {st.input} -> {st.output}")
    print(f"  updated   {age:.0f}s ago")
    for key, n in st.counts.items():
        print(f"  {key:<32} {n:>10}")
    return 0
