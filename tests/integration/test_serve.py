"""`inferline serve` with no bootstrap servers: one command, an embedded broker, a pipeline."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import uuid

import pytest

from pipeline.client import InferenceClient
from tests.integration.conftest import Pipeline


async def test_serve_all_on_an_embedded_broker(
    pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> None:
    s = pipeline.settings.model_copy(update={
        "bootstrap_servers": None,
        "topic_prefix": f"laptop-{uuid.uuid4().hex[:6]}",
        "state_dir": tmp_path_factory.mktemp("serve-state"),
        "worker_id": "laptop",
    })
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERLINE_")}
    env.update(s.to_env())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents.cli", "serve", "--role", "all",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        bootstrap = None
        lines: list[str] = []
        while bootstrap is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, "serve exited early:\n" + "".join(lines)
            lines.append(line)
            found = re.search(r"embedded broker at (\S+?);", line)
            bootstrap = found.group(1) if found else None
        drain = asyncio.create_task(proc.stdout.read())
        async with InferenceClient(s, bootstrap_servers=bootstrap) as client:
            resp = await client.wait_until_served("digits", {"input": pipeline.x[:2]})
        assert resp is not None and resp.status == "ok"
        assert resp.worker == "laptop-all"
        assert len({o.name: o for o in resp.outputs}["label"].data) == 2
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        await drain
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_started_before_its_broker_waits_for_it(
    pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from agents.processes import ServeProcess
    from pipeline.broker import EmbeddedBroker, free_port

    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    s = pipeline.settings.model_copy(update={
        "topic_prefix": f"early-{uuid.uuid4().hex[:6]}",
        "state_dir": tmp_path_factory.mktemp("early-state"),
    })
    proc = ServeProcess(s, bootstrap, "all", worker_id="early")
    await proc.start()
    try:
        # No broker yet: the process must keep waiting, not exit.
        for _ in range(30):
            await asyncio.sleep(0.1)
            assert proc.returncode is None, proc.tail()
        async with EmbeddedBroker(port=port) as broker:
            assert broker.bootstrap_servers == bootstrap
            async with InferenceClient(s, bootstrap_servers=bootstrap) as client:
                resp = await client.wait_until_served("digits", {"input": pipeline.x[:1]})
            assert resp is not None and resp.status == "ok", proc.tail()
            assert "broker not ready" in proc.log_path.read_text(errors="replace")
            assert await proc.stop() == 0
    finally:
        await proc.stop()
