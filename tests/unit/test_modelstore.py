"""The demo model store: a real digits classifier, trained, converted and registered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline.errors import ModelLoadError, RegistryError
from pipeline.modelstore import (
    MIN_HELDOUT_ACCURACY,
    ONNX_IR_VERSION,
    ONNX_OPSET,
    BuildReport,
    build_digits,
    ensure_models,
    load_heldout,
    render_registry,
    sha256_file,
    write_registry,
)
from pipeline.registry import ModelEntry, Registry


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuildReport]:
    model_dir = tmp_path_factory.mktemp("models")
    return model_dir, build_digits(model_dir)


def test_build_writes_model_heldout_and_registry(store: tuple[Path, BuildReport]) -> None:
    model_dir, report = store
    assert report.path == model_dir / "digits" / "1" / "model.onnx"
    assert report.path.is_file()
    assert (model_dir / "registry.toml").is_file()
    assert (report.model, report.version) == ("digits", "1")
    # load_digits has 1797 images; a stratified 25 % split keeps 450 back.
    assert (report.n_train, report.n_test) == (1347, 450)
    x, y = load_heldout(model_dir)
    assert x.dtype == np.float32 and x.shape == (450, 64)
    assert y.dtype == np.int64 and y.shape == (450,)
    assert x.min() >= 0 and x.max() <= 16
    assert set(np.unique(y)) == set(range(10))


def test_registry_entry_matches_the_built_file(store: tuple[Path, BuildReport]) -> None:
    model_dir, report = store
    text = (model_dir / "registry.toml").read_text(encoding="utf-8")
    assert 'path = "digits/1/model.onnx"' in text
    spec = Registry.load(model_dir / "registry.toml").resolve("digits")
    assert spec.path == report.path
    assert spec.sha256 == sha256_file(report.path)
    assert spec.max_batch_size == 64
    assert spec.max_wait_ms == 4.0
    assert spec.execution_provider == "auto"
    assert spec.hourly_usd == pytest.approx(0.10)
    assert [(t.name, t.datatype, t.shape) for t in spec.inputs] == [("input", "FP32", (-1, 64))]
    assert [(t.name, t.datatype, t.shape) for t in spec.outputs] == [
        ("label", "INT64", (-1,)),
        ("probabilities", "FP32", (-1, 10)),
    ]


def test_onnx_runtime_accuracy_matches_sklearn(store: tuple[Path, BuildReport]) -> None:
    model_dir, report = store
    x, y = load_heldout(model_dir)
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], {"input": x})
    accuracy = float(np.mean(label == y))
    assert accuracy >= MIN_HELDOUT_ACCURACY
    assert accuracy == pytest.approx(report.heldout_accuracy)
    assert abs(report.heldout_accuracy - report.sklearn_accuracy) <= 0.005
    assert proba.dtype == np.float32 and proba.shape == (450, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(proba.argmax(axis=1), label)


def test_model_uses_an_ir_and_opset_onnx_runtime_accepts(store: tuple[Path, BuildReport]) -> None:
    model = onnx.load(store[1].path)
    assert model.ir_version == ONNX_IR_VERSION
    default_opset = {o.domain: o.version for o in model.opset_import}[""]
    assert default_opset <= ONNX_OPSET
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["label", "probabilities"]


def test_ensure_models_is_a_no_op_when_the_store_is_complete(
    store: tuple[Path, BuildReport],
) -> None:
    model_dir, report = store
    before = (sha256_file(report.path), (model_dir / "registry.toml").read_bytes())
    assert ensure_models(model_dir, models=["digits"]) == []
    assert (sha256_file(report.path), (model_dir / "registry.toml").read_bytes()) == before


def test_ensure_models_builds_an_empty_store_and_force_rebuilds_identically(
    tmp_path: Path,
) -> None:
    built = ensure_models(tmp_path, models=["digits"])
    assert [(r.model, r.version) for r in built] == [("digits", "1")]
    digest = sha256_file(built[0].path)
    assert ensure_models(tmp_path, models=["digits"]) == []
    rebuilt = ensure_models(tmp_path, force=True, models=["digits"])
    assert len(rebuilt) == 1
    # Same seed, same bytes: the registry digest stays valid across rebuilds.
    assert sha256_file(rebuilt[0].path) == digest


def test_ensure_models_rebuilds_when_the_registry_entry_is_missing(
    store: tuple[Path, BuildReport], tmp_path: Path
) -> None:
    model_dir, report = store
    other = Registry.load(model_dir / "registry.toml").entries["digits"]
    write_registry(tmp_path, [other.model_copy(update={"name": "other"})])
    (tmp_path / "digits" / "1").mkdir(parents=True)
    (tmp_path / "digits" / "1" / "model.onnx").write_bytes(report.path.read_bytes())
    built = ensure_models(tmp_path, models=["digits"])
    assert len(built) == 1
    assert Registry.load(tmp_path / "registry.toml").names() == ["digits", "other"]


def test_ensure_models_refuses_unknown_models(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no builder for models \['nope'\]"):
        ensure_models(tmp_path, models=["nope"])


def test_rewriting_keeps_fields_and_rollout_set_by_other_writers(
    store: tuple[Path, BuildReport], tmp_path: Path
) -> None:
    model_dir, _ = store
    entry = Registry.load(model_dir / "registry.toml").entries["digits"]
    version = entry.versions[0].model_copy(
        update={"pool": "gpu", "precision": "fp32", "slo_p99_ms": 50.0, "max_inflight": 99}
    )
    custom = entry.model_copy(update={
        "name": "custom", "versions": (version.model_copy(update={"name": "custom"}),),
        "rollout": entry.rollout.model_copy(update={"min_agreement": 0.5, "steps": (10.0, 100.0)}),
    })
    write_registry(tmp_path, [custom])
    build_digits(tmp_path)  # rewrites the registry with its own entry added
    kept = Registry.load(tmp_path / "registry.toml").entries["custom"]
    assert kept.versions[0].pool == "gpu" and kept.versions[0].max_inflight == 99
    assert kept.versions[0].slo_p99_ms == 50.0 and kept.versions[0].precision == "fp32"
    assert kept.rollout.min_agreement == 0.5 and kept.rollout.steps == (10.0, 100.0)


def test_build_keeps_other_models_entries(store: tuple[Path, BuildReport], tmp_path: Path) -> None:
    model_dir, _ = store
    digits = Registry.load(model_dir / "registry.toml").entries["digits"]
    write_registry(tmp_path, [digits.model_copy(update={"name": "zeta"})])
    build_digits(tmp_path)
    registry = Registry.load(tmp_path / "registry.toml")
    assert registry.names() == ["digits", "zeta"]
    assert registry.resolve("zeta").path == digits.versions[0].path


def test_build_refuses_to_overwrite_a_broken_registry(tmp_path: Path) -> None:
    (tmp_path / "registry.toml").write_text("[models.digits\n", encoding="utf-8")
    with pytest.raises(RegistryError, match="not valid TOML"):
        build_digits(tmp_path)
    assert (tmp_path / "registry.toml").read_text(encoding="utf-8") == "[models.digits\n"
    assert not (tmp_path / "digits").exists()


def test_relative_model_dir_writes_paths_relative_to_the_registry(
    store: tuple[Path, BuildReport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, _ = store
    entry: ModelEntry = Registry.load(model_dir / "registry.toml").entries["digits"]
    version = entry.versions[0].model_copy(update={"path": Path("store/digits/1/model.onnx")})
    monkeypatch.chdir(tmp_path)
    text = render_registry([entry.model_copy(update={"versions": (version,)})], Path("store"))
    assert 'path = "digits/1/model.onnx"' in text


def test_render_registry_escapes_strings(store: tuple[Path, BuildReport], tmp_path: Path) -> None:
    entry = Registry.load(store[0] / "registry.toml").entries["digits"]
    odd = entry.versions[0].model_copy(update={"path": tmp_path / 'we"ird\\dir' / "m.onnx"})
    write_registry(tmp_path, [entry.model_copy(update={"versions": (odd,)})])
    assert Registry.load(tmp_path / "registry.toml").resolve("digits").path == odd.path


def test_load_heldout_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"heldout\.npz"):
        load_heldout(tmp_path)
