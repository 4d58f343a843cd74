"""Builds the demo models into a model store folder and keeps its registry in step.

The store layout is ``<model_dir>/registry.toml`` plus ``<model_dir>/<name>/<version>/
model.onnx``; the registry format is documented in :mod:`pipeline.registry`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from pipeline.errors import ModelLoadError
from pipeline.registry import ModelEntry, ModelVersion, Registry, TensorSpec

DIGITS = "digits"
DIGITS_VERSION = "1"
# ONNX Runtime 1.31 refuses IR version 14 (what onnx 1.23 writes by default); IR 9
# covers opsets up to 20, so it is readable by every ORT release since 1.15.
ONNX_IR_VERSION = 9
ONNX_OPSET = 17
ONNX_ML_OPSET = 3
MIN_HELDOUT_ACCURACY = 0.95
# ORT computes in float32 while scikit-learn uses float64; a handful of borderline
# rows may flip, anything more means the conversion is wrong.
MAX_ORT_SKLEARN_GAP = 0.005

REGISTRY_FILE = "registry.toml"
HELDOUT_FILE = "heldout.npz"

DIGITS_INPUTS = (TensorSpec(name="input", datatype="FP32", shape=(-1, 64)),)
DIGITS_OUTPUTS = (
    TensorSpec(name="label", datatype="INT64", shape=(-1,)),
    TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 10)),
)


@dataclass(frozen=True)
class BuildReport:
    """What one model build produced and how well the model does on held-out data."""

    model: str
    version: str
    path: Path
    heldout_accuracy: float
    sklearn_accuracy: float
    n_train: int
    n_test: int
    seconds: float


def sha256_file(path: Path) -> str:
    """Hex SHA-256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    # Workers may read the registry or a model while a build runs; a rename
    # means they see the old file or the new one, never half of one.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _toml_str(value: str) -> str:
    # A JSON string literal is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(value)


def _toml_tensor(spec: TensorSpec) -> str:
    shape = ", ".join(str(d) for d in spec.shape)
    return (
        f"{{ name = {_toml_str(spec.name)}, datatype = {_toml_str(spec.datatype)}, "
        f"shape = [{shape}] }}"
    )


def _render_version(name: str, v: ModelVersion, base: Path) -> list[str]:
    # Paths are compared absolute: a relative model_dir gives relative version paths,
    # which are relative to the working directory, not to the registry file.
    path, abs_base = v.path.absolute(), base.absolute()
    if path.is_relative_to(abs_base):
        path = path.relative_to(abs_base)
    lines = [
        f"[[models.{name}.versions]]",
        f"version = {_toml_str(v.version)}",
        f"path = {_toml_str(path.as_posix())}",
        f"max_batch_size = {v.max_batch_size}",
        f"max_wait_ms = {float(v.max_wait_ms)!r}",
        f"execution_provider = {_toml_str(v.execution_provider)}",
        f"hourly_usd = {float(v.hourly_usd)!r}",
    ]
    if v.sha256 is not None:
        lines.append(f"sha256 = {_toml_str(v.sha256)}")
    lines.append("inputs = [")
    lines += [f"  {_toml_tensor(t)}," for t in v.inputs]
    lines.append("]")
    lines.append("outputs = [")
    lines += [f"  {_toml_tensor(t)}," for t in v.outputs]
    lines.append("]")
    return lines


def render_registry(entries: Iterable[ModelEntry], base: Path) -> str:
    """The registry TOML for ``entries``; paths under ``base`` are written relative to it."""
    lines = ["# Written by pipeline.modelstore; model paths are relative to this file.", ""]
    for entry in sorted(entries, key=lambda e: e.name):
        lines += [f"[models.{entry.name}]", f"default_version = {_toml_str(entry.default_version)}"]
        for v in entry.versions:
            lines.append("")
            lines += _render_version(entry.name, v, base)
        lines.append("")
    return "\n".join(lines)


def write_registry(model_dir: Path, entries: Iterable[ModelEntry]) -> Path:
    """Write ``model_dir/registry.toml`` holding exactly ``entries``; returns its path."""
    path = model_dir / REGISTRY_FILE
    _atomic_write(path, render_registry(entries, model_dir).encode("utf-8"))
    return path


def _existing_entries(model_dir: Path) -> dict[str, ModelEntry]:
    """The entries already registered in ``model_dir``, which a build must keep."""
    path = model_dir / REGISTRY_FILE
    # An unreadable registry raises RegistryError rather than being overwritten: it
    # may hold hand-written entries this builder knows nothing about.
    return dict(Registry.load(path).entries) if path.exists() else {}


def _train_digits(seed: int) -> tuple[Any, Any, npt.NDArray[Any], npt.NDArray[Any], int]:
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    clf = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=1000, random_state=seed)
    # The scaler sits inside the pipeline so the ONNX graph takes raw 0-16 pixels.
    model = Pipeline([("scale", StandardScaler()), ("mlp", clf)])
    with warnings.catch_warnings():
        # Adam converges in ~80 epochs here; a non-converged fit is still caught
        # by the accuracy floor, so the warning would only add noise.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
    return model, clf, np.asarray(x_test), np.asarray(y_test), len(y_train)


def _convert(model: Any, clf: Any, seed: int, n_train: int) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType

    onx: onnx.ModelProto = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, 64]))],
        final_types=[
            ("label", Int64TensorType([None])),
            ("probabilities", FloatTensorType([None, 10])),
        ],
        options={id(clf): {"zipmap": False}},
        target_opset={"": ONNX_OPSET, "ai.onnx.ml": ONNX_ML_OPSET},
    )
    onx.ir_version = ONNX_IR_VERSION
    # skl2onnx names the graph with a fresh UUID; a fixed name keeps the bytes (and
    # so the registry's sha256) identical across rebuilds with the same seed.
    onx.graph.name = f"{DIGITS}_{DIGITS_VERSION}"
    onnx.helper.set_model_props(
        onx,
        {
            "inferline.model": DIGITS,
            "inferline.version": DIGITS_VERSION,
            "inferline.seed": str(seed),
            "inferline.n_train": str(n_train),
        },
    )
    onnx.checker.check_model(onx)
    return onx


def _ort_accuracy(
    model_bytes: bytes, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
) -> float:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], {"input": x})
    if label.dtype != np.int64 or label.shape != y.shape or proba.shape != (len(y), 10):
        raise ModelLoadError(
            f"converted {DIGITS}:{DIGITS_VERSION} returns label {label.dtype}{label.shape} and "
            f"probabilities {proba.dtype}{proba.shape}; expected int64{y.shape} and "
            f"float32({len(y)}, 10)"
        )
    return float(np.mean(label == y))


def build_digits(model_dir: Path, *, seed: int = 0) -> BuildReport:
    """Train the ``digits`` classifier, convert it to ONNX and register it in ``model_dir``.

    Writes ``digits/1/model.onnx``, ``digits/heldout.npz`` (the held-out split, for
    measuring accuracy end to end) and the ``digits`` entry of ``registry.toml``.
    Raises :class:`ModelLoadError` when the converted model disagrees with
    scikit-learn or misses the accuracy floor; nothing is written in that case.
    """
    start = time.perf_counter()
    # Read first, so a broken registry stops the build before anything is written.
    entries = _existing_entries(model_dir)
    model, clf, x_test_raw, y_test_raw, n_train = _train_digits(seed)
    x_test = x_test_raw.astype(np.float32)
    y_test = y_test_raw.astype(np.int64)
    sklearn_accuracy = float(model.score(x_test_raw, y_test_raw))

    model_bytes = _convert(model, clf, seed, n_train).SerializeToString()
    ort_accuracy = _ort_accuracy(model_bytes, x_test, y_test)
    gap = abs(ort_accuracy - sklearn_accuracy)
    if gap > MAX_ORT_SKLEARN_GAP:
        raise ModelLoadError(
            f"{DIGITS}:{DIGITS_VERSION} ONNX accuracy {ort_accuracy:.4f} differs from "
            f"scikit-learn's {sklearn_accuracy:.4f} by {gap:.4f}, over the limit "
            f"{MAX_ORT_SKLEARN_GAP}",
            model=DIGITS,
            seed=seed,
        )
    if ort_accuracy < MIN_HELDOUT_ACCURACY:
        raise ModelLoadError(
            f"{DIGITS}:{DIGITS_VERSION} held-out accuracy {ort_accuracy:.4f} (seed={seed}) is "
            f"below the floor {MIN_HELDOUT_ACCURACY}",
            model=DIGITS,
            seed=seed,
        )

    model_path = model_dir / DIGITS / DIGITS_VERSION / "model.onnx"
    _atomic_write(model_path, model_bytes)
    buf = io.BytesIO()
    np.savez(buf, x=x_test, y=y_test)
    _atomic_write(model_dir / DIGITS / HELDOUT_FILE, buf.getvalue())
    # The registry goes last so an entry never points at a file not yet written.
    version = ModelVersion(
        name=DIGITS,
        version=DIGITS_VERSION,
        path=model_path,
        inputs=DIGITS_INPUTS,
        outputs=DIGITS_OUTPUTS,
        max_batch_size=64,
        max_wait_ms=4.0,
        execution_provider="auto",
        hourly_usd=0.10,
        sha256=hashlib.sha256(model_bytes).hexdigest(),
    )
    entries[DIGITS] = ModelEntry(name=DIGITS, default_version=DIGITS_VERSION, versions=(version,))
    write_registry(model_dir, entries.values())
    return BuildReport(
        model=DIGITS,
        version=DIGITS_VERSION,
        path=model_path,
        heldout_accuracy=ort_accuracy,
        sklearn_accuracy=sklearn_accuracy,
        n_train=n_train,
        n_test=len(y_test),
        seconds=time.perf_counter() - start,
    )


def _digits_present(model_dir: Path) -> bool:
    model_path = model_dir / DIGITS / DIGITS_VERSION / "model.onnx"
    registry_path = model_dir / REGISTRY_FILE
    if not (model_path.is_file() and (model_dir / DIGITS / HELDOUT_FILE).is_file()):
        return False
    if not registry_path.is_file():
        return False
    entry = Registry.load(registry_path).entries.get(DIGITS)
    return entry is not None and any(v.version == DIGITS_VERSION for v in entry.versions)


def ensure_models(model_dir: Path, *, force: bool = False) -> list[BuildReport]:
    """Build the demo models missing from ``model_dir`` (all of them with ``force``).

    Returns a report per model built; an empty list means the store was complete.
    """
    if force or not _digits_present(model_dir):
        return [build_digits(model_dir)]
    return []


def load_heldout(
    model_dir: Path, name: str = DIGITS
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The held-out inputs and labels saved by the build of model ``name``."""
    path = model_dir / name / HELDOUT_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"held-out set {str(path)!r} for model {name!r} does not exist; "
            "run `inferline models build`",
            model=name,
            path=str(path),
        )
    with np.load(path, allow_pickle=False) as data:
        x = np.asarray(data["x"], dtype=np.float32)
        y = np.asarray(data["y"], dtype=np.int64)
    return x, y
