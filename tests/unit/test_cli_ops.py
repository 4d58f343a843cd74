"""``inferline pools``: pool assignments rewrite the registry and keep everything else."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agents.cli_ops import parse_assignments, register, write_pools
from pipeline.errors import RegistryError
from pipeline.registry import Registry
from pipeline.settings import Settings

_BODY = """
[models.digits]
default_version = "1"

[[models.digits.versions]]
version = "1"
path = "digits/1/model.onnx"
max_batch_size = 32
hourly_usd = 0.25
sha256 = "{sha}"
inputs = [{{ name = "input", datatype = "FP32", shape = [-1, 64] }}]
outputs = [{{ name = "label", datatype = "INT64", shape = [-1] }}]

[models.minilm]
default_version = "1"

[[models.minilm.versions]]
version = "1"
path = "minilm/1/model.onnx"
inputs = [{{ name = "text", datatype = "BYTES", shape = [-1] }}]
outputs = [{{ name = "embedding", datatype = "FP32", shape = [-1, 384] }}]

[[models.minilm.versions]]
version = "2"
path = "minilm/2/model.onnx"
inputs = [{{ name = "text", datatype = "BYTES", shape = [-1] }}]
outputs = [{{ name = "embedding", datatype = "FP32", shape = [-1, 384] }}]
""".format(sha="ab" * 32)


def _registry(tmp_path: Path) -> Registry:
    path = tmp_path / "registry.toml"
    path.write_text(_BODY, encoding="utf-8")
    return Registry.load(path)


def test_write_pools_moves_models_and_keeps_the_rest(tmp_path: Path) -> None:
    before = _registry(tmp_path)
    assert before.pools() == {"default": ["digits", "minilm"]}
    after = write_pools(before, {"digits": "cpu", "minilm": "gpu"})
    assert after.pools() == {"cpu": ["digits"], "gpu": ["minilm"]}
    assert Registry.load(tmp_path / "registry.toml").pools() == after.pools()
    for name, entry in before.entries.items():
        moved = after.entries[name]
        assert moved.default_version == entry.default_version
        assert [v.model_dump(exclude={"pool"}) for v in moved.versions] == [
            v.model_dump(exclude={"pool"}) for v in entry.versions
        ]
    assert {v.pool for v in after.entries["minilm"].versions} == {"gpu"}


def test_write_pools_refuses_unknown_models(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"\['nope'\] are not in registry"):
        write_pools(_registry(tmp_path), {"nope": "cpu"})
    assert _registry(tmp_path).pools() == {"default": ["digits", "minilm"]}


@pytest.mark.parametrize("bad", ["digits", "=cpu", "digits=", "digits=a/b", "digits=" + "x" * 65])
def test_malformed_assignments_are_refused(bad: str) -> None:
    with pytest.raises(RegistryError, match="is not MODEL=POOL"):
        parse_assignments([bad])


def _inferline(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(Settings(), args))


def test_pools_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _registry(tmp_path)
    monkeypatch.setenv("INFERLINE_REGISTRY", str(tmp_path / "registry.toml"))
    monkeypatch.setenv("INFERLINE_TOPIC_PREFIX", "px")
    assert _inferline(["pools", "set", "digits=cpu", "minilm=gpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == ["cpu\tdigits\tpx-worker-cpu", "gpu\tminilm\tpx-worker-gpu"]
    assert _inferline(["pools", "set", "digits=default"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "default\tdigits\tpx-worker", "gpu\tminilm\tpx-worker-gpu"
    ]
    assert _inferline(["pools"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "default\tdigits\tpx-worker", "gpu\tminilm\tpx-worker-gpu"
    ]
    with pytest.raises(RegistryError, match="is not MODEL=POOL"):
        _inferline(["pools", "set", "digits"])
