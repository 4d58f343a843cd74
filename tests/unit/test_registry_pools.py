"""Registry fields of the fleet: pools, precision, SLO, rollout policy, warm-up buckets."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import RegistryError
from pipeline.registry import Registry

_IO = """inputs = [{ name = "x", datatype = "FP32", shape = [-1, 4] }]
outputs = [{ name = "y", datatype = "INT64", shape = [-1] }]
"""


def _registry(tmp_path: Path, body: str) -> Registry:
    path = tmp_path / "registry.toml"
    path.write_text(body, encoding="utf-8")
    return Registry.load(path)


def _model(name: str, versions: list[tuple[str, str | None]], extra: str = "") -> str:
    text = f'[models.{name}]\ndefault_version = "{versions[0][0]}"\n{extra}\n'
    for version, pool in versions:
        text += f'[[models.{name}.versions]]\nversion = "{version}"\npath = "{name}.onnx"\n'
        text += (f'pool = "{pool}"\n' if pool else "") + _IO
    return text


def test_fleet_fields_and_defaults(tmp_path: Path) -> None:
    reg = _registry(tmp_path, _model("a", [("1", None)]) + _model(
        "b", [("1", "gpu"), ("2", "gpu")],
        '[models.b.rollout]\nmin_agreement = 0.95\nwindow = 40\nsteps = [10, 50, 100]\n',
    ).replace('version = "2"\n', 'version = "2"\nprecision = "int8"\nslo_p99_ms = 80\n'))
    a, b2 = reg.resolve("a"), reg.resolve("b", "2")
    assert (a.pool, a.precision, a.slo_p99_ms) == ("default", None, 200.0)
    assert (b2.pool, b2.precision, b2.slo_p99_ms) == ("gpu", "int8", 80.0)
    policy = reg.entries["b"].rollout
    assert (policy.min_agreement, policy.window, policy.steps) == (0.95, 40, (10, 50, 100))
    assert reg.entries["a"].rollout.steps == (5, 25, 50, 100)
    assert reg.pools() == {"default": ["a"], "gpu": ["b"]}


def test_versions_of_a_model_must_share_a_pool(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"versions of model 'b' are in different pools "
                       r"\{'1': 'gpu', '2': 'default'\}.*lane topics"):
        _registry(tmp_path, _model("b", [("1", "gpu"), ("2", "default")]))


def test_bad_rollout_table_is_a_registry_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="rollout steps"):
        _registry(tmp_path, _model("a", [("1", None)], "[models.a.rollout]\nsteps = [50, 10]\n"))


def test_served_models_per_pool(tmp_path: Path) -> None:
    reg = _registry(tmp_path, _model("a", [("1", None)]) + _model("c", [("1", None)])
                    + _model("b", [("1", "gpu")]))
    assert reg.served_models("default") == ["a", "c"]
    assert reg.served_models("gpu") == ["b"]
    assert reg.served_models("default", ["c"]) == ["c"]
    with pytest.raises(RegistryError, match=r"pool 'default' cannot serve \{'b': 'gpu'\}"):
        reg.served_models("default", ["a", "b"])
    with pytest.raises(RegistryError, match=r"no model .* is in pool 'tpu'"):
        reg.served_models("tpu")
    with pytest.raises(RegistryError, match="not in registry"):
        reg.served_models("default", ["zzz"])


def test_warmup_buckets_cover_every_power_of_two_and_the_maximum(tmp_path: Path) -> None:
    reg = _registry(tmp_path, _model("a", [("1", None)]).replace(
        'version = "1"\n', 'version = "1"\nmax_batch_size = 48\n'))
    assert reg.resolve("a").batch_buckets == (1, 2, 4, 8, 16, 32, 48)
    assert reg.resolve("a").model_copy(update={"max_batch_size": 1}).batch_buckets == (1,)
    assert reg.resolve("a").model_copy(update={"max_batch_size": 64}).batch_buckets[-2:] == (
        32, 64)
