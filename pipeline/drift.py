"""Output drift: a model's recent outputs compared with a reference distribution.

Two kinds of output summary, both additive so that per-second summaries from many
workers merge into one window by summing:

- :class:`ClassHistogram` for classifiers: how many rows got each label. Drift is the
  population stability index (PSI) of the window's histogram against the reference's.
- :class:`EmbeddingSummary` for embedders: the row count, the sum and sum of squares
  of the rows' L2 norms, and the sum of the L2-normalised rows. From these the mean
  norm, its spread, the centroid direction and the mean cosine of the rows to any
  fixed direction follow exactly, so the mean cosine of the window's rows to the
  reference centroid needs no per-row data.

A :class:`Reference` is either the first ``N`` rows a model version produced after
warm-up or promotion (:class:`ReferenceBuilder`) or read from a reference file
(:func:`load_references`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from pipeline.errors import InferlineError

# Proportions of empty bins are lifted to this before the logarithm: one class that
# a window never saw must not make PSI infinite.
PSI_EPSILON = 1e-4
# The usual reading of PSI: < 0.1 stable, 0.1-0.2 shifting, > 0.2 shifted.
PSI_THRESHOLD = 0.2
# Embedders: relative change of the mean L2 norm, and absolute fall of the mean cosine
# of the rows to the reference centroid, beyond which the outputs count as drifted.
NORM_SHIFT_THRESHOLD = 0.1
COSINE_DROP_THRESHOLD = 0.1
# Rows a reference or a window needs before a comparison means anything.
MIN_REFERENCE_ROWS = 500
MIN_WINDOW_ROWS = 50

REFERENCE_FILE_VERSION = 1


class DriftError(InferlineError):
    """Summaries that cannot be compared (mismatched bins, dimensions, kinds)."""

    code = "DRIFT"


@dataclass(frozen=True)
class ClassHistogram:
    """Rows per class label (index = label) of a classifier's outputs."""

    counts: tuple[float, ...]

    kind: Literal["classes"] = field(default="classes", init=False)

    @classmethod
    def from_labels(cls, labels: npt.ArrayLike, n_classes: int) -> ClassHistogram:
        """Histogram of integer ``labels`` over ``n_classes`` bins."""
        arr = np.asarray(labels, dtype=np.int64).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise DriftError(
                f"labels must lie in [0, {n_classes}); got {int(arr.min())}..{int(arr.max())}",
                n_classes=n_classes,
            )
        return cls(tuple(float(c) for c in np.bincount(arr, minlength=n_classes)))

    @property
    def rows(self) -> int:
        """Rows counted."""
        return int(sum(self.counts))

    def merge(self, other: ClassHistogram) -> ClassHistogram:
        """The histogram of both; a shorter one is padded with empty bins."""
        n = max(len(self.counts), len(other.counts))
        a = (*self.counts, *([0.0] * (n - len(self.counts))))
        b = (*other.counts, *([0.0] * (n - len(other.counts))))
        return ClassHistogram(tuple(x + y for x, y in zip(a, b, strict=True)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": self.kind, "counts": list(self.counts)}


@dataclass(frozen=True)
class EmbeddingSummary:
    """Additive statistics of a batch of embedding rows."""

    count: int
    norm_sum: float
    norm_sq_sum: float
    unit_sum: tuple[float, ...]

    kind: Literal["embedding"] = field(default="embedding", init=False)

    @classmethod
    def from_rows(cls, rows: npt.ArrayLike) -> EmbeddingSummary:
        """Summary of a ``[N, D]`` array of embeddings (zero rows add nothing to unit_sum)."""
        arr = np.asarray(rows, dtype=np.float64)
        if arr.ndim != 2:
            raise DriftError(f"embeddings must be [N, D]; got shape {arr.shape}")
        norms = np.linalg.norm(arr, axis=1)
        safe = np.where(norms > 0, norms, 1.0)
        unit = (arr / safe[:, None]).sum(axis=0)
        return cls(
            count=int(arr.shape[0]),
            norm_sum=float(norms.sum()),
            norm_sq_sum=float((norms * norms).sum()),
            unit_sum=tuple(float(v) for v in unit),
        )

    @property
    def rows(self) -> int:
        """Rows summarised."""
        return self.count

    @property
    def mean_norm(self) -> float:
        """Mean L2 norm of the rows."""
        return self.norm_sum / self.count if self.count else 0.0

    @property
    def norm_std(self) -> float:
        """Standard deviation of the rows' L2 norms."""
        if not self.count:
            return 0.0
        var = self.norm_sq_sum / self.count - self.mean_norm**2
        return math.sqrt(max(var, 0.0))

    @property
    def mean_unit(self) -> npt.NDArray[np.float64]:
        """Mean of the L2-normalised rows; its length is the rows' mean cosine to it."""
        vec = np.asarray(self.unit_sum, dtype=np.float64)
        return vec / self.count if self.count else vec

    def mean_cosine_to(self, direction: npt.NDArray[np.float64]) -> float:
        """Mean cosine similarity of the rows to ``direction`` (any non-zero vector)."""
        norm = float(np.linalg.norm(direction))
        if norm == 0 or not self.count:
            return 0.0
        if direction.shape != (len(self.unit_sum),):
            raise DriftError(
                f"embedding dimensions differ: {len(self.unit_sum)} vs {direction.shape}"
            )
        return float(self.mean_unit @ direction) / norm

    def merge(self, other: EmbeddingSummary) -> EmbeddingSummary:
        """The summary of both batches together."""
        if self.count and other.count and len(self.unit_sum) != len(other.unit_sum):
            raise DriftError(
                f"embedding dimensions differ: {len(self.unit_sum)} vs {len(other.unit_sum)}"
            )
        if not self.count:
            return other
        if not other.count:
            return self
        return EmbeddingSummary(
            count=self.count + other.count,
            norm_sum=self.norm_sum + other.norm_sum,
            norm_sq_sum=self.norm_sq_sum + other.norm_sq_sum,
            unit_sum=tuple(a + b for a, b in zip(self.unit_sum, other.unit_sum, strict=True)),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "kind": self.kind,
            "count": self.count,
            "norm_sum": self.norm_sum,
            "norm_sq_sum": self.norm_sq_sum,
            "unit_sum": list(self.unit_sum),
        }


OutputSummary = ClassHistogram | EmbeddingSummary


def summary_from_dict(body: Mapping[str, Any]) -> OutputSummary:
    """Inverse of ``to_dict``: raises :class:`DriftError` on anything else."""
    kind = body.get("kind")
    try:
        if kind == "classes":
            return ClassHistogram(tuple(float(c) for c in body["counts"]))
        if kind == "embedding":
            return EmbeddingSummary(
                count=int(body["count"]),
                norm_sum=float(body["norm_sum"]),
                norm_sq_sum=float(body["norm_sq_sum"]),
                unit_sum=tuple(float(v) for v in body["unit_sum"]),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise DriftError(f"malformed {kind} summary: {exc!r}") from exc
    raise DriftError(f"unknown output summary kind {kind!r}; expected classes or embedding")


def merge_summaries(summaries: Iterable[OutputSummary]) -> OutputSummary | None:
    """Sum of ``summaries`` (all of one kind); None when there are none."""
    total: OutputSummary | None = None
    for s in summaries:
        if total is None:
            total = s
        elif isinstance(total, ClassHistogram) and isinstance(s, ClassHistogram):
            total = total.merge(s)
        elif isinstance(total, EmbeddingSummary) and isinstance(s, EmbeddingSummary):
            total = total.merge(s)
        else:
            raise DriftError(f"cannot merge a {total.kind} summary with a {s.kind} summary")
    return total


def psi(
    reference: Sequence[float], observed: Sequence[float], *, epsilon: float = PSI_EPSILON
) -> float:
    """Population stability index of ``observed`` against ``reference`` (counts per bin).

    ``sum((o - r) * ln(o / r))`` over the bins' proportions, where a proportion below
    ``epsilon`` (an empty bin) is raised to ``epsilon``. 0 for identical shapes;
    histograms of different lengths are compared with the shorter padded by empty bins.
    """
    n = max(len(reference), len(observed))
    ref = np.zeros(n)
    obs = np.zeros(n)
    ref[: len(reference)] = reference
    obs[: len(observed)] = observed
    if (ref < 0).any() or (obs < 0).any():
        raise DriftError("histogram counts must not be negative")
    if ref.sum() <= 0 or obs.sum() <= 0:
        raise DriftError(
            f"PSI needs rows on both sides: reference {ref.sum():g}, observed {obs.sum():g}"
        )
    p = np.maximum(ref / ref.sum(), epsilon)
    q = np.maximum(obs / obs.sum(), epsilon)
    return float(((q - p) * np.log(q / p)).sum())


@dataclass(frozen=True)
class DriftThresholds:
    """Where each drift measure starts to count as drift."""

    psi: float = PSI_THRESHOLD
    norm_shift: float = NORM_SHIFT_THRESHOLD
    cosine_drop: float = COSINE_DROP_THRESHOLD
    min_window_rows: int = MIN_WINDOW_ROWS


@dataclass(frozen=True)
class DriftResult:
    """One comparison of a window with its reference."""

    kind: Literal["classes", "embedding"]
    drifted: bool
    rows: int
    detail: str
    psi: float | None = None
    norm_shift: float | None = None
    cosine: float | None = None
    reference_cosine: float | None = None

    @property
    def score(self) -> float:
        """The headline figure: PSI for classifiers, the worse of the two embedding measures."""
        if self.psi is not None:
            return self.psi
        return max(self.norm_shift or 0.0, (self.reference_cosine or 0.0) - (self.cosine or 0.0))


def compare(
    reference: OutputSummary,
    observed: OutputSummary,
    thresholds: DriftThresholds | None = None,
) -> DriftResult:
    """Compare a window's outputs with the reference; says what moved and by how much."""
    t = thresholds or DriftThresholds()
    enough = observed.rows >= t.min_window_rows
    if isinstance(reference, ClassHistogram) and isinstance(observed, ClassHistogram):
        value = psi(reference.counts, observed.counts)
        drifted = enough and value > t.psi
        top = _dominant(observed.counts)
        detail = f"class histogram PSI={value:.2f} over {observed.rows} rows (threshold {t.psi})"
        if drifted and top is not None:
            detail += f"; {top}"
        return DriftResult("classes", drifted, observed.rows, detail, psi=value)
    if isinstance(reference, EmbeddingSummary) and isinstance(observed, EmbeddingSummary):
        if not reference.count or not observed.count:
            raise DriftError("embedding comparison needs rows on both sides")
        ref_norm = reference.mean_norm
        shift = abs(observed.mean_norm - ref_norm) / ref_norm if ref_norm else 0.0
        centroid = reference.mean_unit
        ref_cos = float(np.linalg.norm(centroid))
        cos = observed.mean_cosine_to(centroid)
        parts: list[str] = []
        if shift > t.norm_shift:
            parts.append(
                f"mean embedding norm {observed.mean_norm:.3g} vs reference {ref_norm:.3g} "
                f"({shift:+.0%}, threshold {t.norm_shift:.0%})"
            )
        if ref_cos - cos > t.cosine_drop:
            parts.append(
                f"mean cosine to the reference centroid {cos:.2f} vs {ref_cos:.2f} "
                f"(drop {ref_cos - cos:.2f}, threshold {t.cosine_drop})"
            )
        drifted = enough and bool(parts)
        detail = "; ".join(parts) or (
            f"embedding norm {observed.mean_norm:.3g} (reference {ref_norm:.3g}), cosine to "
            f"reference centroid {cos:.2f} (reference {ref_cos:.2f})"
        )
        return DriftResult(
            "embedding", drifted, observed.rows, f"{detail} over {observed.rows} rows",
            norm_shift=shift, cosine=cos, reference_cosine=ref_cos,
        )
    raise DriftError(f"cannot compare a {observed.kind} window with a {reference.kind} reference")


def _dominant(counts: Sequence[float]) -> str | None:
    total = sum(counts)
    if total <= 0:
        return None
    top = max(range(len(counts)), key=lambda i: counts[i])
    return f"{counts[top] / total:.0%} of rows are class {top}"


@dataclass(frozen=True)
class Reference:
    """The output distribution a model version is compared with."""

    model: str
    version: str
    summary: OutputSummary
    source: str  # "first N rows" or the file it came from
    captured_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (see :func:`save_references`)."""
        return {
            "model": self.model,
            "version": self.version,
            "captured_ms": self.captured_ms,
            "summary": self.summary.to_dict(),
        }


class ReferenceBuilder:
    """Accumulates the first ``min_rows`` rows of a model version into a reference."""

    def __init__(self, model: str, version: str, *, min_rows: int = MIN_REFERENCE_ROWS) -> None:
        if min_rows < 1:
            raise DriftError(f"min_rows must be at least 1; got {min_rows}", min_rows=min_rows)
        self.model = model
        self.version = version
        self.min_rows = min_rows
        self._acc: OutputSummary | None = None
        self.reference: Reference | None = None

    @property
    def rows(self) -> int:
        """Rows accumulated so far."""
        return self._acc.rows if self._acc is not None else 0

    def add(self, summary: OutputSummary, now_ms: float) -> Reference | None:
        """Add a summary; returns the reference once it is complete (and from then on)."""
        if self.reference is not None:
            return self.reference
        self._acc = merge_summaries([self._acc, summary] if self._acc is not None else [summary])
        if self._acc is not None and self._acc.rows >= self.min_rows:
            self.reference = Reference(
                self.model, self.version, self._acc, f"first {self._acc.rows} rows", now_ms
            )
        return self.reference


def save_references(path: Path, references: Iterable[Reference]) -> None:
    """Write references to a JSON file that :func:`load_references` reads back."""
    body = {
        "format": REFERENCE_FILE_VERSION,
        "references": [r.to_dict() for r in references],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1), encoding="utf-8")


def load_references(path: Path) -> dict[tuple[str, str], Reference]:
    """References by (model, version) from a file written by :func:`save_references`."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DriftError(f"reference file {str(path)!r} does not exist", path=str(path)) from exc
    except json.JSONDecodeError as exc:
        raise DriftError(f"reference file {str(path)!r} is not JSON: {exc}") from exc
    found = body.get("format") if isinstance(body, dict) else None
    if found != REFERENCE_FILE_VERSION:
        raise DriftError(
            f"reference file {str(path)!r} has format {found!r}; "
            f"expected {REFERENCE_FILE_VERSION}"
        )
    out: dict[tuple[str, str], Reference] = {}
    for i, entry in enumerate(body.get("references", [])):
        try:
            ref = Reference(
                model=str(entry["model"]),
                version=str(entry["version"]),
                summary=summary_from_dict(entry["summary"]),
                source=str(path),
                captured_ms=float(entry.get("captured_ms", 0.0)),
            )
        except (KeyError, TypeError) as exc:
            raise DriftError(
                f"reference file {str(path)!r} entry {i} is malformed: {exc!r}"
            ) from exc
        out[(ref.model, ref.version)] = ref
    return out
