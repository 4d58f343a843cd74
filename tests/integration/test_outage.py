"""A broker that stops answering for a while: the pipeline waits, then resumes.

The broker process is frozen with SIGSTOP (connections stay open, nothing is
answered: a hung or partitioned broker) for longer than the group session
timeout, then thawed. Requests sent before and during the outage are all
answered afterwards, no process dies, and the logs stay bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from typing import Any

import numpy as np
import pytest

from agents.processes import ServeProcess
from agents.serve import prepare_topics
from pipeline.broker import EmbeddedBroker
from pipeline.client import InferenceClient
from pipeline.settings import Settings
from tests.integration.conftest import Pipeline

OUTAGE_S = 8


def _request(x: np.ndarray[Any, Any], rid: str) -> dict[str, object]:
    return {"id": rid, "model": "digits", "inputs": [
        {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x.tolist()}]}


@pytest.mark.timeout(400)
async def test_pipeline_resumes_after_a_broker_outage(
    pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> None:
    s: Settings = pipeline.settings.model_copy(update={
        "topic_prefix": f"outage-{uuid.uuid4().hex[:6]}",
        "state_dir": tmp_path_factory.mktemp("outage-state"),
    })
    x = pipeline.x
    async with EmbeddedBroker(log_path=s.state_dir / "broker.log") as broker:
        bootstrap = broker.bootstrap_servers
        await prepare_topics(s, bootstrap, ["digits"])
        procs = [ServeProcess(s, bootstrap, role, worker_id=f"outage-{role}")
                 for role in ("router", "worker")]
        for p in procs:
            await p.start()
        try:
            async with InferenceClient(s, bootstrap_servers=bootstrap) as client:
                await client.wait_until_served("digits", {"input": x[:1]})
                before = [await client.submit(_request(x[i % len(x)], f"before-{i}"))
                          for i in range(300)]
                await asyncio.wait_for(asyncio.gather(*before), 60)

                assert broker.pid is not None
                os.kill(broker.pid, signal.SIGSTOP)
                try:
                    during = [await client.submit(_request(x[i % len(x)], f"during-{i}"))
                              for i in range(300)]
                    await asyncio.sleep(OUTAGE_S)
                    for p in procs:
                        assert p.returncode is None, f"{p.role} died:\n{p.tail()}"
                finally:
                    os.kill(broker.pid, signal.SIGCONT)

                answers = await asyncio.wait_for(asyncio.gather(*during), 240)
                assert [a.status for a in answers] == ["ok"] * len(during)
                after = await client.infer("digits", {"input": x[:2]}, wait_timeout_ms=60_000)
                assert after.status == "ok"
            for p in procs:
                assert p.returncode is None, f"{p.role} died:\n{p.tail()}"
                # Bounded logging: an outage is a handful of lines, not one per poll.
                lines = p.log_path.read_text(errors="replace").splitlines()
                assert len(lines) < 400, f"{p.role} logged {len(lines)} lines"
        finally:
            codes = [await p.stop() for p in procs]
        assert codes == [0, 0], [p.tail() for p in procs]
