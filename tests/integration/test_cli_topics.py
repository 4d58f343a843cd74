"""``inferline topics create`` against the embedded broker: every topic, its partitions."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from pipeline.settings import Settings
from pipeline.topics import PRIORITIES, fixed_topics, lane_topics

_REGISTRY = """
[models.alpha]
default_version = "1"

[[models.alpha.versions]]
version = "1"
path = "alpha.onnx"
inputs = [{ name = "x", datatype = "FP32", shape = [-1, 4] }]
outputs = [{ name = "y", datatype = "INT64", shape = [-1] }]

[models.beta]
default_version = "1"

[[models.beta.versions]]
version = "1"
path = "beta.onnx"
pool = "gpu"
inputs = [{ name = "x", datatype = "FP32", shape = [-1, 4] }]
outputs = [{ name = "y", datatype = "INT64", shape = [-1] }]
"""


async def test_topics_create_makes_every_topic_of_the_registry(
    settings: Settings, broker: str, tmp_path: Path
) -> None:
    registry = tmp_path / "registry.toml"
    registry.write_text(_REGISTRY, encoding="utf-8")
    s = settings.model_copy(update={
        "topic_prefix": f"tc-{uuid.uuid4().hex[:8]}", "partitions": 3, "registry": registry,
        "bootstrap_servers": broker,
    })
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents.cli", "topics", "create",
        env={**os.environ, **s.to_env()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0, text
    expected = [*fixed_topics(s), *lane_topics(s, ["alpha", "beta"])]
    assert len(expected) == len(fixed_topics(s)) + 2 * len(PRIORITIES)
    assert set(expected) <= set(text.splitlines()), text

    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        described = await admin.describe_topics(expected)
    finally:
        await admin.close()
    partitions = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
    assert partitions == dict.fromkeys(expected, 3), described
