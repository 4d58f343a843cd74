"""ModelSession against the real digits model built by pipeline.modelstore."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import InferenceFailed, ModelLoadError
from pipeline.modelstore import build_digits, load_heldout, sha256_file
from pipeline.registry import ModelVersion, Registry, TensorSpec
from pipeline.session import (
    CPU,
    CUDA,
    ModelSession,
    choose_providers,
    cuda_unavailable_reason,
    representative_input,
)

# The unit-test host has no usable CUDA; on a GPU host the CPU-only assertions are
# replaced by "CUDA or CPU with a reason".
NO_CUDA = cuda_unavailable_reason() is not None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    build_digits(path)
    return path


@pytest.fixture(scope="module")
def spec(model_dir: Path) -> ModelVersion:
    return Registry.load(model_dir / "registry.toml").resolve("digits")


@pytest.fixture(scope="module")
def heldout(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_heldout(model_dir)


@pytest.fixture
def session(spec: ModelVersion) -> Iterator[ModelSession]:
    s = ModelSession(spec, provider="cpu")
    s.load()
    yield s
    s.close()


def test_auto_provider_reports_what_actually_runs(
    spec: ModelVersion, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="inferline.session")
    with ModelSession(spec) as s:
        lines = [r.getMessage() for r in caplog.records if r.name == "inferline.session"]
        assert len(lines) == 1
        if NO_CUDA:
            assert s.execution_provider == CPU
            assert s.fallback_reason == cuda_unavailable_reason()
            reason = s.fallback_reason
            assert lines[0] == f"digits:1 execution provider {CPU} (CUDA unavailable: {reason})"
        else:
            assert s.execution_provider in (CUDA, CPU)
            assert (s.fallback_reason is None) == (s.execution_provider == CUDA)
    # The fallback is explained by our one line, not by ONNX Runtime's error log.
    assert "onnxruntime" not in capfd.readouterr().err


def test_cpu_provider_is_honoured(spec: ModelVersion, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inferline.session")
    assert choose_providers("cpu") == [CPU]
    with ModelSession(spec, provider="cpu") as s:
        assert s.execution_provider == CPU
        assert s.fallback_reason is None
    assert [r.getMessage() for r in caplog.records if r.name == "inferline.session"] == [
        f"digits:1 execution provider {CPU} (requested cpu)"
    ]


def test_spec_provider_applies_when_the_override_is_auto(spec: ModelVersion) -> None:
    s = ModelSession(spec.model_copy(update={"execution_provider": "cpu"}), provider="auto")
    assert s.requested == "cpu"
    assert ModelSession(spec, provider="cuda").requested == "cuda"


@pytest.mark.skipif(not NO_CUDA, reason="this host can run CUDA")
def test_choose_providers_without_cuda() -> None:
    assert choose_providers("auto") == [CPU]
    assert choose_providers("cuda") == [CPU]


def test_run_on_heldout_rows_gives_the_right_labels(
    session: ModelSession, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = heldout
    out = session.run({"input": x})
    assert list(out) == ["label", "probabilities"]
    assert out["label"].dtype == np.int64 and out["label"].shape == y.shape
    assert out["probabilities"].dtype == np.float32 and out["probabilities"].shape == (len(y), 10)
    assert float(np.mean(out["label"] == y)) >= 0.95
    assert np.array_equal(out["probabilities"].argmax(axis=1), out["label"])


def test_batched_run_equals_row_by_row(
    session: ModelSession, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x = heldout[0][:64]
    batched = session.run({"input": x})
    rows = [session.run({"input": x[i : i + 1]}) for i in range(len(x))]
    assert np.array_equal(batched["label"], np.concatenate([r["label"] for r in rows]))
    np.testing.assert_allclose(
        batched["probabilities"],
        np.concatenate([r["probabilities"] for r in rows]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_sha256_mismatch_is_refused_naming_both_digests(spec: ModelVersion) -> None:
    wrong = "0" * 64
    s = ModelSession(spec.model_copy(update={"sha256": wrong}))
    with pytest.raises(ModelLoadError) as info:
        s.load()
    assert wrong in str(info.value)
    assert sha256_file(spec.path) in str(info.value)
    assert not s.loaded
    s.close()


@pytest.mark.parametrize(
    ("field", "specs", "named"),
    [
        ("inputs", (TensorSpec(name="pixels", datatype="FP32", shape=(-1, 64)),), "pixels"),
        ("inputs", (TensorSpec(name="input", datatype="FP64", shape=(-1, 64)),), "double"),
        ("outputs", (TensorSpec(name="logits", datatype="FP32", shape=(-1, 10)),), "logits"),
    ],
)
def test_io_mismatch_is_refused(
    spec: ModelVersion, field: str, specs: tuple[TensorSpec, ...], named: str
) -> None:
    with pytest.raises(ModelLoadError, match=field) as info:
        ModelSession(spec.model_copy(update={field: specs})).load()
    assert named in str(info.value)


def test_missing_file_is_refused(spec: ModelVersion, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot be read"):
        ModelSession(spec.model_copy(update={"path": tmp_path / "gone.onnx"})).load()


def test_non_onnx_file_is_refused(spec: ModelVersion, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="refused by ONNX Runtime"):
        ModelSession(spec.model_copy(update={"path": junk, "sha256": None})).load()


def test_warmup_sets_warm(session: ModelSession) -> None:
    assert not session.warm
    seconds = session.warmup()
    assert session.warm
    assert seconds == session.warmup_s > 0
    session.warmup([3, 3, 7])


def test_representative_input_fills_free_dimensions() -> None:
    t = TensorSpec(name="x", datatype="INT64", shape=(-1, 3, -1))
    arr = representative_input(t, 5)
    assert arr.shape == (5, 3, 1) and arr.dtype == np.int64 and not arr.any()


def test_ort_failure_raises_inference_failed(session: ModelSession) -> None:
    bad = np.zeros((4, 64), dtype=np.float64)
    with pytest.raises(InferenceFailed, match="batch of 4") as info:
        session.run({"input": bad})
    assert "'digits'" in str(info.value)


def test_run_before_load_and_after_close_is_refused(spec: ModelVersion) -> None:
    s = ModelSession(spec)
    x = np.zeros((1, 64), dtype=np.float32)
    with pytest.raises(ModelLoadError, match="not loaded"):
        s.run({"input": x})
    s.load()
    s.close()
    s.close()
    with pytest.raises(ModelLoadError, match="closed"):
        s.run({"input": x})
    with pytest.raises(ModelLoadError, match="closed"):
        s.load()


async def test_run_async_returns_compute_seconds_and_frees_the_loop(
    session: ModelSession, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = heldout
    big = np.repeat(x, 20, axis=0)
    task = asyncio.create_task(session.run_async({"input": big}))
    ticks = 0
    while not task.done():
        ticks += 1
        await asyncio.sleep(0)
    # A run that blocked the loop would finish in the task's first step (one tick);
    # on the session's own thread the loop keeps turning while it computes.
    assert ticks >= 2
    out, compute_s = task.result()
    assert compute_s > 0
    assert np.array_equal(out["label"], np.repeat(session.run({"input": x})["label"], 20))
    assert float(np.mean(out["label"] == np.repeat(y, 20))) >= 0.95


async def test_run_async_after_close_is_refused(spec: ModelVersion) -> None:
    s = ModelSession(spec, provider="cpu")
    s.load()
    s.close()
    with pytest.raises(ModelLoadError, match="closed"):
        await s.run_async({"input": np.zeros((1, 64), dtype=np.float32)})


async def test_instances_run_batches_at_once_on_one_session(
    spec: ModelVersion, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = heldout
    with ModelSession(spec, provider="cpu", instances=2) as two:
        assert two.instances == 2
        # Left to ORT each run would take every core: they are shared out.
        assert two.intra_op_threads == max((os.cpu_count() or 1) // 2, 1)
        inside: set[str] = set()
        real_run = two.run
        # The first two runs wait for each other: with one thread the second could
        # never start while the first waits, and the barrier would time out.
        both = threading.Barrier(2, timeout=10)
        calls = 0
        lock = threading.Lock()

        def run(inputs: Any) -> Any:
            nonlocal calls
            with lock:
                calls += 1
                first_two = calls <= 2
            inside.add(threading.current_thread().name)
            if first_two:
                both.wait()
            return real_run(inputs)

        two.run = run  # type: ignore[method-assign]
        chunks = [x[i * 50:(i + 1) * 50] for i in range(8)]
        results = await asyncio.gather(*(two.run_async({"input": c}) for c in chunks))
    # Every batch answered with its own rows' labels, from more than one thread.
    for i, (outputs, _) in enumerate(results):
        assert (outputs["label"] == y[i * 50:(i + 1) * 50]).mean() > 0.9
    assert len(inside) == 2, inside
