"""The model registry: a TOML file naming each model, its versions and their limits.

Example::

    [models.digits]
    default_version = "1"

    [[models.digits.versions]]
    version = "1"
    path = "digits/1/model.onnx"        # relative to the registry file
    max_batch_size = 64
    max_wait_ms = 4.0
    execution_provider = "auto"          # auto | cuda | cpu
    hourly_usd = 0.10
    inputs = [{ name = "input", datatype = "FP32", shape = [-1, 64] }]
    outputs = [
      { name = "label", datatype = "INT64", shape = [-1] },
      { name = "probabilities", datatype = "FP32", shape = [-1, 10] },
    ]
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import RegistryError, UnknownModel


class TensorSpec(BaseModel):
    """Name, datatype and shape of a model input or output; -1 marks a free dimension."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    datatype: Literal[
        "BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
    ]
    shape: tuple[int, ...]


class ModelVersion(BaseModel):
    """One deployable version of a model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    version: str
    path: Path
    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=5.0, ge=0, le=10_000)
    execution_provider: Literal["auto", "cuda", "cpu"] = "auto"
    hourly_usd: float = Field(default=0.0, ge=0)
    sha256: str | None = None

    @property
    def key(self) -> str:
        """``model:version``, for logs and metric labels."""
        return f"{self.name}:{self.version}"


class ModelEntry(BaseModel):
    """A model and its versions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    default_version: str
    versions: tuple[ModelVersion, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _default_exists(self) -> ModelEntry:
        if self.default_version not in {v.version for v in self.versions}:
            raise ValueError(
                f"default_version {self.default_version!r} of model {self.name!r} "
                "is not among its versions"
            )
        return self


class Registry:
    """Looks up model versions by name and optional version."""

    def __init__(self, entries: dict[str, ModelEntry], source: Path | None = None) -> None:
        self.entries = entries
        self.source = source
        self._versions: dict[tuple[str, str], ModelVersion] = {
            (e.name, v.version): v for e in entries.values() for v in e.versions
        }

    @classmethod
    def load(cls, path: Path) -> Registry:
        """Read and validate a registry file; model paths resolve against its folder."""
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise RegistryError(
                f"registry file {str(path)!r} does not exist; run `inferline models build` "
                "or set INFERLINE_REGISTRY",
                path=str(path),
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise RegistryError(f"registry file {str(path)!r} is not valid TOML: {exc}") from exc
        return cls.from_dict(raw, base=path.parent, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, object], base: Path, source: Path | None = None) -> Registry:
        """Build a registry from parsed TOML; relative paths resolve against ``base``."""
        models = raw.get("models")
        if not isinstance(models, dict) or not models:
            raise RegistryError("registry has no [models.<name>] tables", source=str(source))
        entries: dict[str, ModelEntry] = {}
        for name, body in models.items():
            if not isinstance(body, dict):
                raise RegistryError(f"registry entry models.{name} is not a table")
            raw_versions = body.get("versions", [])
            versions: list[object] = []
            if isinstance(raw_versions, list):
                for i, v in enumerate(raw_versions):
                    if not isinstance(v, dict):
                        raise RegistryError(
                            f"registry entry models.{name}.versions[{i}] is not a table "
                            f"(got {type(v).__name__}); use [[models.{name}.versions]]",
                            source=str(source),
                        )
                    v = {**v, "name": name, "version": str(v.get("version", ""))}
                    # Only a path that is there is resolved; a missing one is left for
                    # validation to report, rather than pointing at the registry's folder.
                    if isinstance(v.get("path"), str):
                        p = Path(v["path"])
                        v["path"] = p if p.is_absolute() else base / p
                    versions.append(v)
            else:
                versions = raw_versions  # not a list: validation says what is wrong
            try:
                entries[name] = ModelEntry.model_validate(
                    {
                        "name": name,
                        "default_version": str(body.get("default_version", "")),
                        "versions": versions,
                    }
                )
            except ValidationError as exc:
                raise RegistryError(f"registry entry models.{name} is invalid: {exc}") from exc
        return cls(entries, source)

    def resolve(self, model: str, version: str | None = None) -> ModelVersion:
        """The version to serve for a request; raises :class:`UnknownModel`."""
        entry = self.entries.get(model)
        if entry is None:
            raise UnknownModel(model, version, list(self.entries))
        found = self._versions.get((model, version or entry.default_version))
        if found is None:
            raise UnknownModel(model, version, [f"{model}:{v.version}" for v in entry.versions])
        return found

    def __iter__(self) -> Iterator[ModelVersion]:
        return iter(self._versions.values())

    def names(self) -> list[str]:
        """Model names, sorted."""
        return sorted(self.entries)
