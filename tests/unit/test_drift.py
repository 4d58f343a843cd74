"""pipeline.drift: PSI and embedding statistics on controlled distributions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.drift import (
    PSI_THRESHOLD,
    ClassHistogram,
    DriftError,
    DriftThresholds,
    EmbeddingSummary,
    Reference,
    ReferenceBuilder,
    compare,
    load_references,
    merge_summaries,
    psi,
    save_references,
    summary_from_dict,
)


def _labels(rng: np.random.Generator, probs: list[float], n: int) -> np.ndarray:
    return rng.choice(len(probs), size=n, p=probs)


def test_psi_of_identical_histograms_is_zero() -> None:
    assert psi([10, 20, 30], [10, 20, 30]) == 0.0
    # Same shape, different totals: PSI compares proportions.
    assert psi([10, 20, 30], [100, 200, 300]) == pytest.approx(0.0, abs=1e-12)


def test_psi_matches_the_formula_on_concrete_numbers() -> None:
    p = np.array([0.5, 0.5])
    q = np.array([0.9, 0.1])
    expected = float(((q - p) * np.log(q / p)).sum())
    assert psi([50, 50], [90, 10]) == pytest.approx(expected)
    assert expected == pytest.approx(0.8789, abs=1e-4)


def test_psi_smooths_empty_bins() -> None:
    # The window never saw classes 1..9: finite, and far above the threshold.
    value = psi([100] * 10, [1000] + [0] * 9)
    assert math.isfinite(value)
    assert value > 5
    # An empty reference bin is smoothed too.
    assert math.isfinite(psi([0, 10], [5, 5]))


def test_psi_is_symmetric_in_its_arguments() -> None:
    a, b = [30, 50, 20], [10, 40, 50]
    assert psi(a, b) == pytest.approx(psi(b, a))


def test_psi_of_samples_from_one_distribution_stays_below_threshold() -> None:
    rng = np.random.default_rng(1)
    probs = [0.1] * 10
    ref = ClassHistogram.from_labels(_labels(rng, probs, 2000), 10)
    for _ in range(20):
        window = ClassHistogram.from_labels(_labels(rng, probs, 500), 10)
        assert psi(ref.counts, window.counts) < 0.05


def test_psi_of_a_shifted_distribution_is_above_threshold() -> None:
    rng = np.random.default_rng(2)
    ref = ClassHistogram.from_labels(_labels(rng, [0.1] * 10, 2000), 10)
    skewed = [0.55] + [0.05] * 9
    window = ClassHistogram.from_labels(_labels(rng, skewed, 500), 10)
    assert psi(ref.counts, window.counts) > PSI_THRESHOLD


def test_psi_rejects_empty_or_negative_histograms() -> None:
    with pytest.raises(DriftError, match="rows on both sides"):
        psi([0, 0], [1, 2])
    with pytest.raises(DriftError, match="negative"):
        psi([1, -1], [1, 2])


def test_class_histogram_from_labels_and_merge() -> None:
    h = ClassHistogram.from_labels([0, 2, 2, 1], 4)
    assert h.counts == (1.0, 1.0, 2.0, 0.0)
    assert h.rows == 4
    assert h.merge(ClassHistogram((1.0, 1.0))).counts == (2.0, 2.0, 2.0, 0.0)
    with pytest.raises(DriftError, match=r"\[0, 4\)"):
        ClassHistogram.from_labels([4], 4)


def test_embedding_summary_statistics_are_exact() -> None:
    rows = np.array([[3.0, 4.0], [0.0, 2.0]])
    s = EmbeddingSummary.from_rows(rows)
    assert s.count == 2
    assert s.mean_norm == pytest.approx(3.5)
    assert s.norm_std == pytest.approx(1.5)
    # Unit rows (0.6, 0.8) and (0, 1); their cosine to (0, 1) is 0.8 and 1.
    assert s.mean_cosine_to(np.array([0.0, 5.0])) == pytest.approx(0.9)


def test_embedding_summaries_merge_like_one_batch() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(25, 8))
    merged = EmbeddingSummary.from_rows(a).merge(EmbeddingSummary.from_rows(b))
    whole = EmbeddingSummary.from_rows(np.vstack([a, b]))
    assert merged.count == whole.count
    assert merged.norm_sum == pytest.approx(whole.norm_sum)
    assert merged.norm_sq_sum == pytest.approx(whole.norm_sq_sum)
    assert np.allclose(merged.unit_sum, whole.unit_sum)


def _cluster(rng: np.random.Generator, center: np.ndarray, n: int, scale: float) -> np.ndarray:
    rows = center + rng.normal(scale=scale, size=(n, center.size))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)  # L2-normalised, like minilm


def test_embeddings_from_the_reference_distribution_do_not_drift() -> None:
    rng = np.random.default_rng(4)
    center = rng.normal(size=64)
    ref = EmbeddingSummary.from_rows(_cluster(rng, center, 1000, 0.2))
    window = EmbeddingSummary.from_rows(_cluster(rng, center, 300, 0.2))
    result = compare(ref, window)
    assert not result.drifted, result
    assert result.norm_shift == pytest.approx(0.0, abs=1e-9)
    assert result.cosine == pytest.approx(result.reference_cosine, abs=0.02)


def test_embeddings_around_another_centroid_drift_on_cosine() -> None:
    rng = np.random.default_rng(5)
    ref = EmbeddingSummary.from_rows(_cluster(rng, rng.normal(size=64), 1000, 0.2))
    window = EmbeddingSummary.from_rows(_cluster(rng, rng.normal(size=64), 300, 0.2))
    result = compare(ref, window)
    assert result.drifted
    assert result.reference_cosine is not None and result.cosine is not None
    assert result.reference_cosine - result.cosine > 0.5
    assert "cosine to the reference centroid" in result.detail


def test_embeddings_with_larger_norms_drift_on_norm() -> None:
    rng = np.random.default_rng(6)
    center = rng.normal(size=16)
    base = center + rng.normal(scale=0.3, size=(500, 16))
    ref = EmbeddingSummary.from_rows(base)
    window = EmbeddingSummary.from_rows(1.5 * (center + rng.normal(scale=0.3, size=(200, 16))))
    result = compare(ref, window)
    assert result.drifted
    assert result.norm_shift == pytest.approx(0.5, abs=0.05)
    assert "mean embedding norm" in result.detail


def test_compare_classes_reports_psi_and_dominant_class() -> None:
    ref = ClassHistogram((100.0,) * 10)
    same = compare(ref, ClassHistogram((30.0,) * 10))
    assert not same.drifted and same.psi == pytest.approx(0.0)
    skewed = compare(ref, ClassHistogram((300.0,) + (0.0,) * 9))
    assert skewed.drifted
    assert skewed.score == skewed.psi
    assert "class histogram PSI=" in skewed.detail
    assert "100% of rows are class 0" in skewed.detail


def test_compare_needs_enough_window_rows() -> None:
    ref = ClassHistogram((100.0,) * 10)
    few = ClassHistogram((10.0,) + (0.0,) * 9)
    assert not compare(ref, few, DriftThresholds(min_window_rows=50)).drifted
    assert compare(ref, few, DriftThresholds(min_window_rows=5)).drifted


def test_compare_refuses_mixed_kinds() -> None:
    with pytest.raises(DriftError, match="cannot compare"):
        compare(ClassHistogram((1.0,)), EmbeddingSummary.from_rows(np.ones((2, 3))))
    with pytest.raises(DriftError, match="cannot merge"):
        merge_summaries([ClassHistogram((1.0,)), EmbeddingSummary.from_rows(np.ones((2, 3)))])


def test_reference_builder_freezes_after_min_rows() -> None:
    b = ReferenceBuilder("digits", "1", min_rows=100)
    assert b.add(ClassHistogram((30.0, 30.0)), now_ms=1.0) is None
    assert b.rows == 60
    ref = b.add(ClassHistogram((20.0, 40.0)), now_ms=2.0)
    assert ref is not None and ref.summary == ClassHistogram((50.0, 70.0))
    assert ref.captured_ms == 2.0 and ref.source == "first 120 rows"
    # Later rows no longer change it.
    assert b.add(ClassHistogram((0.0, 1000.0)), now_ms=3.0) is ref


def test_references_round_trip_through_a_file(tmp_path: Path) -> None:
    refs = [
        Reference("digits", "1", ClassHistogram((1.0, 2.0, 3.0)), "first 6 rows", 5.0),
        Reference("minilm", "2", EmbeddingSummary.from_rows(np.eye(3)), "x", 7.0),
    ]
    path = tmp_path / "refs.json"
    save_references(path, refs)
    back = load_references(path)
    assert back[("digits", "1")].summary == refs[0].summary
    assert back[("minilm", "2")].summary == refs[1].summary
    assert back[("minilm", "2")].source == str(path)


def test_bad_reference_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DriftError, match="does not exist"):
        load_references(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 99}')
    with pytest.raises(DriftError, match="format 99"):
        load_references(bad)
    with pytest.raises(DriftError, match="unknown output summary kind"):
        summary_from_dict({"kind": "tokens"})
