"""The GPU check's pipeline burst, run here on the CPU.

``bench/gpu_check.sh`` runs only where there is an NVIDIA GPU; its last check sends
a minilm burst through a router and a worker. The same code runs here with the
worker on the CPU, so that a change to the bench's fleet cannot break the check
unseen until a GPU machine runs it.
"""

from __future__ import annotations

from pathlib import Path

from bench.gpu_check import pipeline_burst
from pipeline.broker import EmbeddedBroker
from pipeline.settings import Settings


async def test_the_gpu_checks_pipeline_burst_runs_on_the_cpu(
    pipeline_settings: Settings, embedded_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    base = pipeline_settings.model_copy(
        update={"execution_provider": "cpu", "state_dir": tmp_path / "state"})
    out = await pipeline_burst(base, 40, tmp_path, embedded_broker)
    assert out["ok_share"] == 1.0
    assert out["throughput_rps"] > 0
    assert 1 <= out["mean_batch_size"] <= 40
    # Every answer names the provider that computed it: the check fails unless it is
    # CUDA there, and here it is the CPU's.
    assert out["execution_providers"] == ["CPUExecutionProvider"]
