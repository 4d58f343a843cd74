"""The registry file's TOML form: what ``pipeline.modelstore`` and the CLI write.

:mod:`pipeline.registry` reads the format; this module renders it. Fields a
writer does not know by name (added to the registry since) are rendered from the
pydantic models when they differ from their defaults, so rewriting a registry
never drops what another writer put in it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from pipeline.registry import ModelEntry, ModelVersion, TensorSpec

REGISTRY_FILE = "registry.toml"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a rename: readers see the old file or the new one."""
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


def _relative(path: Path, base: Path) -> Path:
    # Paths are compared absolute: a relative model_dir gives relative version paths,
    # which are relative to the working directory, not to the registry file.
    path, abs_base = path.absolute(), base.absolute()
    return path.relative_to(abs_base) if path.is_relative_to(abs_base) else path


def _toml_value(value: object, base: Path) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, Path):
        return _toml_str(_relative(value, base).as_posix())
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(x, base) for x in value) + "]"
    raise TypeError(f"registry value {value!r} ({type(value).__name__}) has no TOML form here")


def _non_default(model: BaseModel, skip: Iterable[str], base: Path) -> list[str]:
    """``key = value`` lines for the fields of ``model`` that differ from their defaults.

    Fields this module does not name (added to the registry since) are kept this
    way, so rewriting a registry never drops what another writer put in it.
    """
    lines = []
    for key, info in type(model).model_fields.items():
        value = getattr(model, key)
        if key in skip or value is None or (
            not info.is_required() and value == info.get_default(call_default_factory=True)
        ):
            continue
        lines.append(f"{key} = {_toml_value(value, base)}")
    return lines


_VERSION_FIELDS = frozenset({
    "name", "version", "path", "max_batch_size", "max_wait_ms", "execution_provider",
    "hourly_usd", "sha256", "inputs", "outputs",
})


def _render_version(name: str, v: ModelVersion, base: Path) -> list[str]:
    path = _relative(v.path, base)
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
    lines += _non_default(v, _VERSION_FIELDS, base)
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
        rollout = _non_default(entry.rollout, (), base)
        if rollout:
            lines += ["", f"[models.{entry.name}.rollout]", *rollout]
        lines.append("")
    return "\n".join(lines)


def write_registry(model_dir: Path, entries: Iterable[ModelEntry]) -> Path:
    """Write ``model_dir/registry.toml`` holding exactly ``entries``; returns its path."""
    path = model_dir / REGISTRY_FILE
    atomic_write(path, render_registry(entries, model_dir).encode("utf-8"))
    return path
