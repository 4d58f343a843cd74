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
    pool = "default"                     # worker pool; all versions of a model share one
    precision = "fp32"                   # optional, informational

    [models.digits.rollout]              # optional canary policy (RolloutPolicy)
    min_agreement = 0.99
    window = 200
    steps = [5, 25, 50, 100]
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Iterator
from itertools import pairwise
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
    slo_p99_ms: float = Field(default=200.0, gt=0, le=3_600_000)
    """Latency objective of interactive lanes, from the request record's timestamp."""
    max_inflight: int | None = Field(default=None, ge=1, le=1_000_000)
    """Rows a worker holds per lane before pausing it; default 8 x max_batch_size, >= 512."""
    instances: int = Field(default=1, ge=1, le=64)
    """Batches of this version one worker computes at once, each on its own thread."""
    sha256: str | None = None
    # Fleet: the worker pool serving this version (every version of a model shares
    # one, since they share the model's lanes) and its numeric precision.
    pool: str = Field(default="default", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    precision: str | None = Field(default=None, max_length=32)
    # Text models: the declared BYTES input is tokenized by the worker (pipeline/text.py)
    # into the graph's input_ids/attention_mask, with this tokenizer.json, at most
    # max_seq_len tokens per text.
    preprocess: Literal["none", "tokenize"] = "none"
    tokenizer: Path | None = None
    tokenizer_sha256: str | None = None
    max_seq_len: int = Field(default=256, ge=2, le=8192)

    @model_validator(mode="after")
    def _tokenizer_given(self) -> ModelVersion:
        if self.preprocess == "tokenize" and self.tokenizer is None:
            raise ValueError(f"model {self.key} has preprocess = 'tokenize' but no tokenizer")
        return self

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        """Batch sizes warm-up covers: the powers of two below ``max_batch_size``, and it."""
        n = self.max_batch_size
        return (*(1 << i for i in range(n.bit_length()) if 1 << i < n), n)

    @property
    def inflight_limit(self) -> int:
        """Rows a worker holds per lane of this model before pausing the lane."""
        return self.max_inflight or max(8 * self.max_batch_size, 512)

    @property
    def key(self) -> str:
        """``model:version``, for logs and metric labels."""
        return f"{self.name}:{self.version}"


class RolloutPolicy(BaseModel):
    """How a canary of a model is judged and stepped: ``[models.<name>.rollout]``.

    A step passes when, over ``window`` fresh samples, the candidate's error rate
    exceeds the stable version's by at most ``max_error_rate_delta``; its p99 latency
    is at most ``max_p99_ratio`` times the stable one's, or within its ``slo_p99_ms``;
    and on shadow-mirrored requests its outputs agree with the stable version's by at
    least ``min_agreement`` (the share of equal labels for classifiers, the mean cosine
    for embedders; ``agreement = "auto"`` picks by the compared output's datatype).
    ``shadow_percent`` of the stable traffic is mirrored during a canary to measure that.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_agreement: float = Field(default=0.99, ge=0, le=1)
    agreement: Literal["auto", "label", "cosine"] = "auto"
    compare_output: str | None = None
    max_error_rate_delta: float = Field(default=0.01, ge=0, le=1)
    max_p99_ratio: float = Field(default=1.5, gt=0)
    window: int = Field(default=200, ge=1, le=1_000_000)
    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    shadow_percent: float = Field(default=10.0, ge=0, le=100)

    @model_validator(mode="after")
    def _steps_rise_to_100(self) -> RolloutPolicy:
        s = self.steps
        rising = all(a < b for a, b in pairwise(s))
        if not s or s[0] <= 0 or s[-1] != 100 or not rising:
            raise ValueError(
                f"rollout steps {list(s)} must be rising percentages above 0, ending at 100"
            )
        return self


class ModelEntry(BaseModel):
    """A model and its versions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    default_version: str
    versions: tuple[ModelVersion, ...] = Field(min_length=1)
    rollout: RolloutPolicy = Field(default_factory=lambda: RolloutPolicy())

    @model_validator(mode="after")
    def _default_exists(self) -> ModelEntry:
        if self.default_version not in {v.version for v in self.versions}:
            raise ValueError(
                f"default_version {self.default_version!r} of model {self.name!r} "
                "is not among its versions"
            )
        return self

    @property
    def pool(self) -> str:
        """The worker pool serving this model (all its versions share it)."""
        return self.versions[0].pool


class Registry:
    """Looks up model versions by name and optional version."""

    def __init__(self, entries: dict[str, ModelEntry], source: Path | None = None) -> None:
        self.entries = entries
        self.source = source
        _check_pools(entries.values(), source)
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
                    if isinstance(v.get("tokenizer"), str):
                        t = Path(v["tokenizer"])
                        v["tokenizer"] = t if t.is_absolute() else base / t
                    versions.append(v)
            else:
                versions = raw_versions  # not a list: validation says what is wrong
            try:
                entries[name] = ModelEntry.model_validate(
                    {
                        "name": name,
                        "default_version": str(body.get("default_version", "")),
                        "versions": versions,
                        **({"rollout": body["rollout"]} if "rollout" in body else {}),
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

    def pools(self) -> dict[str, list[str]]:
        """Each worker pool and the models it serves, sorted."""
        found: dict[str, list[str]] = {}
        for name in self.names():
            found.setdefault(self.entries[name].pool, []).append(name)
        return dict(sorted(found.items()))

    def served_models(self, pool: str, models: Iterable[str] | None = None) -> list[str]:
        """The models a worker of ``pool`` serves: all of the pool's, or those of ``models``.

        Raises :class:`RegistryError` for a model of another pool (its lanes belong to
        that pool's consumer group) or a pool without models.
        """
        pools = self.pools()
        if models is None:
            if pool not in pools:
                raise RegistryError(
                    f"no model of registry {str(self.source)!r} is in pool {pool!r} "
                    f"(pools: {pools or 'none'})",
                    pool=pool,
                )
            return pools[pool]
        wanted = sorted(set(models))
        unknown = [m for m in wanted if m not in self.entries]
        if unknown:
            raise RegistryError(
                f"models {unknown} are not in registry {str(self.source)!r} "
                f"(known: {self.names()})",
                models=unknown,
            )
        elsewhere = {m: self.entries[m].pool for m in wanted if self.entries[m].pool != pool}
        if elsewhere:
            raise RegistryError(
                f"a worker of pool {pool!r} cannot serve {elsewhere} (model: its pool); "
                "start it with --pool of that model, or leave --models out",
                pool=pool,
                models=sorted(elsewhere),
            )
        return wanted


def _check_pools(entries: Iterable[ModelEntry], source: Path | None) -> None:
    """Every version of a model must be in one pool: the versions share the model's lanes."""
    for entry in entries:
        pools = {v.version: v.pool for v in entry.versions}
        if len(set(pools.values())) > 1:
            raise RegistryError(
                f"registry {str(source)!r}: versions of model {entry.name!r} are in different "
                f"pools {pools}; every version of a model must be in one pool, because they "
                f"share its lane topics (<prefix>.lane.{entry.name}.<priority>)",
                model=entry.name,
                pools=pools,
            )
