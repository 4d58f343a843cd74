"""pipeline.registry: the model registry TOML; no broker, no model files needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import RegistryError, UnknownModel
from pipeline.registry import ModelVersion, Registry, TensorSpec

REGISTRY = """
[models.digits]
default_version = "2"

[[models.digits.versions]]
version = "1"
path = "digits/1/model.onnx"
max_batch_size = 64
max_wait_ms = 4.0
execution_provider = "cpu"
hourly_usd = 0.10
inputs = [{ name = "input", datatype = "FP32", shape = [-1, 64] }]
outputs = [
  { name = "label", datatype = "INT64", shape = [-1] },
  { name = "probabilities", datatype = "FP32", shape = [-1, 10] },
]

[[models.digits.versions]]
version = 2
path = "{abs}"
inputs = [{ name = "input", datatype = "FP32", shape = [-1, 64] }]
outputs = [{ name = "label", datatype = "INT64", shape = [-1] }]

[models.minilm]
default_version = "1"

[[models.minilm.versions]]
version = "1"
path = "../shared/minilm.onnx"
execution_provider = "cuda"
inputs = [{ name = "text", datatype = "BYTES", shape = [-1] }]
outputs = [{ name = "embedding", datatype = "FP32", shape = [-1, 384] }]
"""

ONE_VERSION = """
[models.m]
default_version = "1"

[[models.m.versions]]
version = "1"
path = "m.onnx"
{extra}
inputs = [{{ name = "x", datatype = "FP32", shape = [-1, 2] }}]
outputs = [{{ name = "y", datatype = "FP32", shape = [-1] }}]
"""


def _write(tmp_path: Path, text: str, name: str = "registry.toml") -> Path:
    folder = tmp_path / "store"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    absolute = tmp_path / "elsewhere" / "digits2.onnx"
    return Registry.load(_write(tmp_path, REGISTRY.replace("{abs}", absolute.as_posix())))


def test_load_reads_every_field(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.resolve("digits", "1")
    assert isinstance(v1, ModelVersion)
    assert v1.name == "digits"
    assert v1.version == "1"
    assert v1.key == "digits:1"
    assert v1.max_batch_size == 64
    assert v1.max_wait_ms == 4.0
    assert v1.execution_provider == "cpu"
    assert v1.hourly_usd == pytest.approx(0.10)
    assert v1.inputs == (TensorSpec(name="input", datatype="FP32", shape=(-1, 64)),)
    assert [o.name for o in v1.outputs] == ["label", "probabilities"]
    assert v1.outputs[1].shape == (-1, 10)
    assert registry.source == tmp_path / "store" / "registry.toml"


def test_defaults_of_optional_fields(registry: Registry) -> None:
    v2 = registry.resolve("digits", "2")
    assert v2.max_batch_size == 32
    assert v2.max_wait_ms == 5.0
    assert v2.execution_provider == "auto"
    assert v2.hourly_usd == 0.0
    assert v2.sha256 is None


def test_relative_paths_resolve_against_the_registry_folder(
    registry: Registry, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    assert registry.resolve("digits", "1").path == store / "digits" / "1" / "model.onnx"
    assert registry.resolve("minilm").path == store / ".." / "shared" / "minilm.onnx"


def test_absolute_paths_are_kept(registry: Registry, tmp_path: Path) -> None:
    assert registry.resolve("digits", "2").path == tmp_path / "elsewhere" / "digits2.onnx"


def test_integer_version_is_read_as_a_string(registry: Registry) -> None:
    assert registry.resolve("digits", "2").version == "2"


def test_default_version_is_served_without_a_version(registry: Registry) -> None:
    assert registry.resolve("digits").version == "2"
    assert registry.resolve("digits", None).key == "digits:2"
    assert registry.resolve("minilm").key == "minilm:1"


def test_names_and_iteration(registry: Registry) -> None:
    assert registry.names() == ["digits", "minilm"]
    assert sorted(v.key for v in registry) == ["digits:1", "digits:2", "minilm:1"]


def test_unknown_model_names_the_known_models(registry: Registry) -> None:
    with pytest.raises(UnknownModel) as info:
        registry.resolve("resnet")
    err = info.value
    assert err.code == "UNKNOWN_MODEL"
    assert err.model == "resnet"
    assert err.version is None
    assert str(err) == "model 'resnet' is not in the registry (known: digits, minilm)"


def test_unknown_version_names_the_known_versions(registry: Registry) -> None:
    with pytest.raises(UnknownModel) as info:
        registry.resolve("digits", "9")
    err = info.value
    assert err.version == "9"
    assert "model 'digits' version '9'" in str(err)
    assert "known: digits:1, digits:2" in str(err)


def test_empty_registry_unknown_model_says_none() -> None:
    with pytest.raises(UnknownModel, match=r"known: none"):
        Registry({}).resolve("x")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "registry.toml"
    with pytest.raises(RegistryError) as info:
        Registry.load(path)
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)
    assert "INFERLINE_REGISTRY" in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, "[models.digits\ndefault_version = 1\n")
    with pytest.raises(RegistryError) as info:
        Registry.load(path)
    assert "is not valid TOML" in str(info.value)
    assert str(path) in str(info.value)
    assert info.value.code == "REGISTRY"


@pytest.mark.parametrize("text", ["", "title = 'x'\n", "[models]\n"])
def test_no_models(tmp_path: Path, text: str) -> None:
    with pytest.raises(RegistryError, match=r"no \[models\.<name>\] tables"):
        Registry.load(_write(tmp_path, text))


def test_model_that_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"models\.digits is not a table"):
        Registry.load(_write(tmp_path, "[models]\ndigits = 3\n"))


def test_default_version_not_among_versions(tmp_path: Path) -> None:
    text = ONE_VERSION.format(extra="").replace('default_version = "1"', 'default_version = "7"')
    with pytest.raises(RegistryError) as info:
        Registry.load(_write(tmp_path, text))
    msg = str(info.value)
    assert "models.m is invalid" in msg
    assert "default_version '7'" in msg
    assert "not among its versions" in msg


def test_model_without_versions(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"(?s)models\.m is invalid.*versions"):
        Registry.load(_write(tmp_path, '[models.m]\ndefault_version = "1"\n'))


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("max_batch_size = 0", "max_batch_size"),
        ("max_batch_size = 5000", "max_batch_size"),
        ("max_wait_ms = -1.0", "max_wait_ms"),
        ('execution_provider = "tpu"', "execution_provider"),
        ("hourly_usd = -0.5", "hourly_usd"),
        ('colour = "blue"', "colour"),
    ],
)
def test_bad_field(tmp_path: Path, extra: str, field: str) -> None:
    with pytest.raises(RegistryError) as info:
        Registry.load(_write(tmp_path, ONE_VERSION.format(extra=extra)))
    msg = str(info.value)
    assert "registry entry models.m is invalid" in msg
    assert field in msg


def test_bad_tensor_datatype(tmp_path: Path) -> None:
    text = ONE_VERSION.format(extra="").replace('datatype = "FP32", shape = [-1, 2]',
                                                 'datatype = "FLOAT", shape = [-1, 2]')
    with pytest.raises(RegistryError, match=r"(?s)models\.m is invalid.*datatype.*FLOAT"):
        Registry.load(_write(tmp_path, text))


def test_bad_model_name(tmp_path: Path) -> None:
    text = ONE_VERSION.format(extra="").replace("models.m", 'models."a.b"')
    with pytest.raises(RegistryError, match=r"models\.a\.b is invalid"):
        Registry.load(_write(tmp_path, text))


def test_version_without_path_is_rejected(tmp_path: Path) -> None:
    # `path` is required by ModelVersion; a version without one must not silently
    # point at the registry's own folder.
    text = ONE_VERSION.format(extra="").replace('path = "m.onnx"\n', "")
    with pytest.raises(RegistryError, match="path"):
        Registry.load(_write(tmp_path, text))


def test_version_that_is_not_a_table_is_a_registry_error(tmp_path: Path) -> None:
    text = '[models.m]\ndefault_version = "1"\nversions = ["1"]\n'
    with pytest.raises(RegistryError, match=r"models\.m"):
        Registry.load(_write(tmp_path, text))


def test_from_dict_resolves_against_base(tmp_path: Path) -> None:
    raw = {
        "models": {
            "m": {
                "default_version": "a",
                "versions": [
                    {
                        "version": "a",
                        "path": "sub/m.onnx",
                        "inputs": [{"name": "x", "datatype": "INT64", "shape": [-1]}],
                        "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}],
                    }
                ],
            }
        }
    }
    reg = Registry.from_dict(raw, base=tmp_path)
    assert reg.source is None
    assert reg.resolve("m").path == tmp_path / "sub" / "m.onnx"
    # from_dict must not change the caller's dict.
    assert raw["models"]["m"]["versions"][0]["path"] == "sub/m.onnx"
