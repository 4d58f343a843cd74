"""Text inputs: sub-batch planning, padding and tokenization with the shipped tokenizer.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import minilm
from pipeline.errors import InvalidInput, ModelLoadError
from pipeline.text import TextEncoder, as_texts, check_utf8, plan_chunks, sample_texts


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.load(minilm.source_dir() / minilm.TOKENIZER_FILE, max_seq_len=16)


def test_similar_lengths_stay_one_run() -> None:
    assert plan_chunks([9, 12, 10, 11, 9]) == [[0, 1, 2, 3, 4]]


def test_one_long_text_runs_apart_from_short_ones() -> None:
    lengths = [10] * 20 + [256]
    chunks = plan_chunks(lengths)
    assert chunks == [list(range(20)), [20]]


def test_two_length_groups_split_in_two() -> None:
    lengths = [8, 120, 9, 118, 10, 121, 7, 119]
    assert plan_chunks(lengths) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_empty_and_single() -> None:
    assert plan_chunks([]) == []
    assert plan_chunks([5]) == [[0]]


@given(st.lists(st.integers(min_value=2, max_value=256), min_size=1, max_size=64))
def test_every_row_is_in_exactly_one_chunk(lengths: list[int]) -> None:
    chunks = plan_chunks(lengths)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert all(c == sorted(c) for c in chunks)
    # Padded work never exceeds one run padded to the longest text.
    padded = sum(len(c) * max(lengths[i] for i in c) for c in chunks)
    assert padded <= len(lengths) * max(lengths)


def test_pad_masks_exactly_the_real_tokens(encoder: TextEncoder) -> None:
    feeds = encoder.pad([[101, 7, 102], [101, 102]])
    np.testing.assert_array_equal(feeds["input_ids"], [[101, 7, 102], [101, 102, 0]])
    np.testing.assert_array_equal(feeds["attention_mask"], [[1, 1, 1], [1, 1, 0]])
    assert feeds["input_ids"].dtype == np.int64


def test_truncation_at_max_seq_len_keeps_sep(encoder: TextEncoder) -> None:
    ids = encoder.token_ids("word " * 50)
    assert len(ids) == 16 and ids[0] == 101 and ids[-1] == 102


def test_encode_chunks_cover_every_row_with_its_own_tokens(encoder: TextEncoder) -> None:
    texts = ["hi", "word " * 40, "hello there", "ok"]
    arr = np.array([t.encode() for t in texts], dtype=object)
    chunks = encoder.encode_chunks(arr)
    seen: dict[int, list[int]] = {}
    for rows, feeds in chunks:
        for r, ids, mask in zip(rows, feeds["input_ids"], feeds["attention_mask"], strict=True):
            seen[r] = [int(t) for t, m in zip(ids, mask, strict=True) if m]
    assert seen == {i: encoder.token_ids(t) for i, t in enumerate(texts)}


def test_check_utf8_names_the_bad_element() -> None:
    check_utf8("text", np.array([b"fine", "str too"], dtype=object))
    with pytest.raises(InvalidInput, match=r"element 1 is not valid UTF-8"):
        check_utf8("text", np.array([b"ok", b"\xff"], dtype=object))


def test_sample_texts_cycle_and_decode() -> None:
    texts = as_texts(sample_texts(30))
    assert len(texts) == 30 and all(texts) and texts[0] == texts[12]


def test_a_missing_tokenizer_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot be read"):
        TextEncoder.load(tmp_path / "nope.json", max_seq_len=8)
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="not a tokenizers JSON file"):
        TextEncoder.load(tmp_path / "bad.json", max_seq_len=8)
