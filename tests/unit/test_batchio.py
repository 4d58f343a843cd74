"""Batch job files: input forms, id derivation, in-order release, journal and resume."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.batchio import (
    InOrder,
    JournalWriter,
    check_job_id,
    count_rows,
    default_job_id,
    derive_row_id,
    file_format,
    finalize,
    journal_path,
    latest_by_id,
    output_value,
    read_jsonl_records,
    read_records,
    read_rows,
    row_tensors,
    write_parquet_rows,
)
from pipeline.errors import InvalidRequest
from pipeline.registry import TensorSpec

DIGITS = {"input": TensorSpec(name="input", datatype="FP32", shape=(-1, 64))}
MINILM = {"text": TensorSpec(name="text", datatype="BYTES", shape=(-1,))}


def write_lines(path: Path, objs: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(o) + b"\n" for o in objs))
    return path


def record(index: int, rid: str, status: str = "ok") -> dict[str, Any]:
    return {"index": index, "id": rid, "job_id": "j", "status": status,
            "outputs": {"label": index} if status == "ok" else None,
            "error": None if status == "ok" else {"code": "INVALID_INPUT", "message": "m"},
            "cost_usd": 0.5}


def test_formats_by_extension() -> None:
    assert file_format(Path("a.jsonl")) == "jsonl"
    assert file_format(Path("a.NDJSON")) == "jsonl"
    assert file_format(Path("a.parquet")) == "parquet"
    with pytest.raises(InvalidRequest, match=r"\.csv"):
        file_format(Path("a.csv"))


def test_row_ids_are_derived_from_job_and_index(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", [[1.0] * 64, {"id": "mine", "input": [2.0] * 64},
                                               [3.0] * 64])
    rows = list(read_rows(path, "job-1", ["input"]))
    assert [r.id for r in rows] == [derive_row_id("job-1", 0), "mine", derive_row_id("job-1", 2)]
    # Deterministic: a second read (a rerun) derives the same ids.
    assert [r.id for r in read_rows(path, "job-1", ["input"])] == [r.id for r in rows]
    assert derive_row_id("job-1", 0) != derive_row_id("job-2", 0)
    assert default_job_id(path, "digits") == default_job_id(path, "digits")
    assert default_job_id(path, "digits") != default_job_id(path, "minilm")
    check_job_id(default_job_id(path, "digits"))
    with pytest.raises(InvalidRequest, match="job id"):
        check_job_id("a/b")


def test_three_input_forms_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "inputs": {"text": "hello"}}\n\n{"text": "world"}\n"bare"\n')
    rows = list(read_rows(path, "j", ["text"]))
    assert [r.inputs for r in rows] == [{"text": "hello"}, {"text": "world"}, {"text": "bare"}]
    assert [r.index for r in rows] == [0, 1, 2]
    assert count_rows(path) == 3


def test_malformed_rows_carry_their_error(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"input": [1]}\nnot json\n{"id": ["x"], "input": [1]}\n'
                    '{"id": "o", "other": 1}\n[1, 2]\n')
    rows = list(read_rows(path, "j", ["input"]))
    assert rows[0].error is None
    assert rows[1].error is not None and "line 2" in rows[1].error[1]
    assert rows[2].error is not None and "id" in rows[2].error[1]
    assert rows[3].error is not None and "'other'" in rows[3].error[1]
    # A bare value is fine for a one-input model, and refused when the inputs are unknown.
    assert rows[4].inputs == {"input": [1, 2]}
    unknown = list(read_rows(path, "j", None))
    assert unknown[4].error is not None and "bare list" in unknown[4].error[1]


def test_row_tensors_follow_the_spec_or_the_values() -> None:
    [t] = row_tensors({"input": [0.5] * 64}, DIGITS)
    assert (t["datatype"], t["shape"], len(t["data"])) == ("FP32", [1, 64], 64)
    [t] = row_tensors({"text": "a sentence"}, MINILM)
    assert (t["datatype"], t["shape"], t["data"]) == ("BYTES", [1], ["a sentence"])
    [t] = row_tensors({"x": [[1, 2], [3, 4]]})
    assert (t["datatype"], t["shape"], t["data"]) == ("FP32", [1, 2, 2], [1, 2, 3, 4])
    [t] = row_tensors({"x": "text"})
    assert t["datatype"] == "BYTES"
    # Ragged arrays and text for a numeric input are the row's error, not a crash.
    with pytest.raises(InvalidRequest, match="rectangular"):
        row_tensors({"input": [[1, 2], [3]]}, DIGITS)
    with pytest.raises(InvalidRequest, match=r"not numbers|rectangular"):
        row_tensors({"input": ["a", "b"]}, DIGITS)
    with pytest.raises(InvalidRequest, match="BYTES"):
        row_tensors({"text": 3}, MINILM)


def test_output_value_drops_the_batch_dimension() -> None:
    assert output_value({"shape": [1], "datatype": "INT64", "data": [7]}) == 7
    assert output_value({"shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}) == [1, 2, 3]
    assert output_value({"shape": [1, 2, 2], "datatype": "FP32",
                         "data": [1, 2, 3, 4]}) == [[1, 2], [3, 4]]


def test_in_order_releases_only_the_completed_prefix() -> None:
    indices = [0, 2, 3, 5, 8, 9, 10]
    released: list[int] = []
    order = InOrder(indices, lambda recs: released.extend(r["index"] for r in recs))
    shuffled = indices[:]
    random.Random(7).shuffle(shuffled)
    for i, idx in enumerate(shuffled):
        order.put(idx, {"index": idx})
        # At every step what is released is a prefix of the order, nothing skipped.
        assert released == indices[: len(released)]
        assert order.buffered == i + 1 - len(released)
    assert released == indices
    assert order.done


def test_journal_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    journal = JournalWriter(journal_path(out))
    journal.write([record(0, "a"), record(1, "b")])
    journal.close()
    with out.open("ab") as f:
        f.write(b'{"index": 2, "id": "c", "sta')  # the run was killed mid-write
    assert [r["id"] for r in read_jsonl_records(out)] == ["a", "b"]
    assert [r["id"] for r in read_jsonl_records(out, repair=True)] == ["a", "b"]
    journal = JournalWriter(journal_path(out))
    journal.write([record(2, "c")])
    journal.close()
    assert [r["id"] for r in read_jsonl_records(out)] == ["a", "b", "c"]
    out.write_text('{"no": "index"}\n')
    with pytest.raises(InvalidRequest, match="not a results file"):
        read_jsonl_records(out)


def test_finalize_orders_and_keeps_the_latest_record_per_id(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    journal = JournalWriter(out)
    # A retry appended a new answer for row 1 after rows 0-2 were written.
    journal.write([record(0, "a"), record(1, "b", "error"), record(2, "c"), record(1, "b")])
    journal.close()
    assert finalize(out) == 3
    recs = read_jsonl_records(out)
    assert [(r["index"], r["status"]) for r in recs] == [(0, "ok"), (1, "ok"), (2, "ok")]


def test_finalize_leaves_a_journal_written_in_order_unread(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    journal = JournalWriter(out)
    journal.write([record(0, "a"), record(1, "b")])
    journal.write([record(3, "d")])
    journal.close()
    assert journal.in_order and journal.count == 3
    # What finalize would rewrite is left as written: a file it never reads stays put.
    before = out.read_bytes()
    out.write_bytes(b"not json\n")
    assert finalize(out, journal) == 3
    assert out.read_bytes() == b"not json\n"
    out.write_bytes(before)
    # A rerun appending after the records it found keeps the file final.
    journal = JournalWriter(out, existing=read_jsonl_records(out))
    journal.write([record(4, "e")])
    journal.close()
    assert journal.in_order and journal.count == 4
    assert finalize(out, journal) == 4
    assert [r["id"] for r in read_jsonl_records(out)] == ["a", "b", "d", "e"]


@pytest.mark.parametrize("late", [
    [record(1, "b")],            # a retry superseding row 1's first answer
    [record(1, "z")],            # an earlier row written after a later one
    [record(5, "a")],            # an id written twice under two rows
])
def test_a_journal_out_of_order_is_rewritten_by_finalize(
    tmp_path: Path, late: list[dict[str, Any]]
) -> None:
    out = tmp_path / "out.jsonl"
    journal = JournalWriter(out)
    journal.write([record(0, "a"), record(1, "b", "error"), record(2, "c")])
    journal.write(late)
    journal.close()
    assert not journal.in_order
    want = sorted(latest_by_id(read_jsonl_records(out)).values(), key=lambda r: r["index"])
    assert finalize(out, journal) == len(want)
    assert read_jsonl_records(out) == want


def test_a_journal_knows_records_found_out_of_order(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    journal = JournalWriter(out, existing=[record(2, "c"), record(0, "a")])
    journal.write([record(3, "d")])
    journal.close()
    assert not journal.in_order and journal.count == 3


def test_parquet_input_and_output_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    write_parquet_rows(src, [{"id": f"r{i}", "input": [float(i)] * 64} for i in range(5)])
    assert count_rows(src) == 5
    rows = list(read_rows(src, "j", ["input"]))
    assert [r.id for r in rows] == [f"r{i}" for i in range(5)]
    assert rows[3].inputs == {"input": [3.0] * 64}

    out = tmp_path / "out.parquet"
    journal = JournalWriter(journal_path(out))
    journal.write([record(1, "r1"), record(0, "r0", "error")])
    journal.close()
    assert journal_path(out).name == "out.parquet.partial.jsonl"
    assert [r["id"] for r in read_records(out)] == ["r1", "r0"]
    assert finalize(out) == 2
    assert not journal_path(out).exists()
    # A rerun appends to a fresh journal; the next finalize merges both.
    journal = JournalWriter(journal_path(out))
    journal.write([record(2, "r2")])
    journal.close()
    assert finalize(out) == 3
    recs = read_records(out)
    assert [r["id"] for r in recs] == ["r0", "r1", "r2"]
    assert recs[0]["error"] == {"code": "INVALID_INPUT", "message": "m"}
    assert recs[1]["outputs"] == {"label": 1}
