"""The GPU check's pipeline burst, run here on the CPU.

``bench/gpu_check.sh`` runs only where there is an NVIDIA GPU; its last check sends
a minilm burst through a router and a worker. The same code runs here with the
worker on the CPU, so that a change to the bench's fleet cannot break the check
unseen until a GPU machine runs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from bench.gpu_check import check_provider, node_time_by_provider, pipeline_burst
from pipeline.broker import EmbeddedBroker
from pipeline.registry import Registry
from pipeline.settings import Settings
from pipeline.text import TextEncoder, sample_texts


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


def _minilm_feeds(s: Settings) -> tuple[Path, dict[str, Any]]:
    spec = Registry.load(s.registry_path).resolve("minilm")
    assert spec.tokenizer is not None
    encoder = TextEncoder.load(spec.tokenizer, max_seq_len=spec.max_seq_len)
    return spec.path, dict(encoder.encode(sample_texts(8)))


def test_the_provider_check_refuses_a_session_that_fell_back_to_the_cpu(
    pipeline_settings: Settings,
) -> None:
    path, feeds = _minilm_feeds(pipeline_settings)
    # No usable GPU here: onnxruntime-gpu lists CUDA but the session falls back (or a
    # CPU-only onnxruntime does not list it): either way the check exits 2, the code
    # for "no usable GPU", instead of measuring the CPU under CUDA's name.
    with pytest.raises(SystemExit) as exc:
        check_provider(path, feeds)
    assert exc.value.code == 2


def test_a_profiles_kernels_are_counted_by_the_provider_that_ran_them(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    path, feeds = _minilm_feeds(pipeline_settings)
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "ort-profile")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    time_by, nodes_by = node_time_by_provider(events)
    # The check's CUDA share is read from these counters: on the CPU, all of it is the
    # CPU's, and only kernel events count (not the session's or the run's own).
    assert set(nodes_by) == set(time_by) == {"CPUExecutionProvider"}
    kernels = [e for e in events if str(e.get("name", "")).endswith("_kernel_time")]
    assert nodes_by["CPUExecutionProvider"] == len(kernels) > 0
    assert len(events) > len(kernels)
    assert time_by["CPUExecutionProvider"] > 0
