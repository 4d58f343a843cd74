"""Digits versions for rollout tests: a retrained one and one with permuted labels.

Built into a test's own model dir with the model store's helpers, so the tests
need no other model than digits.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.modelstore import DIGITS_INPUTS, DIGITS_OUTPUTS, build_digits, load_heldout
from pipeline.registry import ModelEntry, ModelVersion, RolloutPolicy


@dataclass(frozen=True)
class DigitsFiles:
    """The model files of the digits versions, with the held-out inputs and labels."""

    files: dict[str, Path]
    x: np.ndarray[Any, Any]
    y: np.ndarray[Any, Any]


def permute_labels(model: onnx.ModelProto, perm: list[int]) -> onnx.ModelProto:
    """A copy of the digits graph whose ``label`` output is ``perm[label]``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producer = next(n for n in g.node if "label" in n.output)
    producer.output[list(producer.output).index("label")] = "label_raw"
    g.initializer.append(numpy_helper.from_array(np.array(perm, dtype=np.int64), "label_perm"))
    g.node.append(helper.make_node("Gather", ["label_perm", "label_raw"], ["label"], axis=0))
    onnx.checker.check_model(out)
    return out


def build_digits_versions(model_dir: Path) -> DigitsFiles:
    """Version 1 (seed 0), 2 (retrained with seed 1) and 3 (version 1, labels shifted by one).

    The files go to ``model_dir/digits/<version>/model.onnx``; tests register them
    under names of their own with :func:`entry`.
    """
    build_digits(model_dir, seed=0)
    v1 = model_dir / "digits" / "1" / "model.onnx"
    scratch = model_dir / "scratch-seed1"
    build_digits(scratch, seed=1)
    v2 = model_dir / "digits" / "2" / "model.onnx"
    v2.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(scratch / "digits" / "1" / "model.onnx", v2)
    shutil.rmtree(scratch)
    v3 = model_dir / "digits" / "3" / "model.onnx"
    v3.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(permute_labels(onnx.load(str(v1)), [(i + 1) % 10 for i in range(10)]), str(v3))
    x, y = load_heldout(model_dir)
    return DigitsFiles({"1": v1, "2": v2, "3": v3}, x, y)


def entry(
    name: str, files: dict[str, Path], versions: Iterable[str], *, pool: str = "default",
    **policy: Any,
) -> ModelEntry:
    """A registry entry named ``name`` serving the given digits versions."""
    vs = tuple(
        ModelVersion(
            name=name, version=v, path=files[v], inputs=DIGITS_INPUTS, outputs=DIGITS_OUTPUTS,
            max_batch_size=64, max_wait_ms=2.0, hourly_usd=0.1, pool=pool,
            sha256=hashlib.sha256(files[v].read_bytes()).hexdigest(),
        )
        for v in versions
    )
    return ModelEntry(name=name, default_version=vs[0].version, versions=vs,
                      rollout=RolloutPolicy.model_validate(policy))
