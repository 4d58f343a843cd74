"""Packing batch-job rows into multi-row requests and splitting the answers back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline import codec
from pipeline.batchio import BatchRow, JournalWriter, output_value, row_tensors
from pipeline.batchjob import _fields, result_record
from pipeline.batchpack import Pack, pack_key, packs, split_outputs
from pipeline.codec import decode
from pipeline.errors import InvalidInput
from pipeline.registry import TensorSpec
from schemas.messages import InferenceResponse

DIGITS = {"input": TensorSpec(name="input", datatype="FP32", shape=(-1, 64))}


def _rows(values: list[Any], name: str = "input") -> list[tuple[BatchRow, list[dict[str, Any]]]]:
    specs = DIGITS if name == "input" else None
    return [(BatchRow(i, f"r{i}", {name: v}), row_tensors({name: v}, specs))
            for i, v in enumerate(values)]


def test_consecutive_rows_of_one_shape_share_a_request_up_to_the_limit() -> None:
    rows = _rows([[float(i)] * 64 for i in range(10)])
    got = list(packs(rows, 4))
    assert [p.size for p in got] == [4, 4, 2]
    assert [r.index for p in got for r in p.rows] == list(range(10))
    (tensor,) = got[0].inputs()
    assert tensor["shape"] == [4, 64] and tensor["datatype"] == "FP32"
    # The stacked tensor decodes to the rows, in order, as the worker reads it.
    stacked = decode(tensor["name"], tensor["datatype"], tensor["shape"], tensor["data"])
    assert stacked.shape == (4, 64)
    assert stacked[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_row_of_another_shape_starts_a_pack_of_its_own() -> None:
    rows = _rows([[1.0] * 64, [2.0] * 64, [3.0] * 10, [4.0] * 64])
    got = list(packs(rows, 16))
    assert [[r.index for r in p.rows] for p in got] == [[0, 1], [2], [3]]
    assert pack_key(got[1].tensors[0]) != pack_key(got[0].tensors[0])
    # A lone row is sent as it would be unpacked: its own id and its own tensors.
    assert got[1].request_id("job") == "r2"
    assert got[1].inputs() == got[1].tensors[0]
    assert got[0].request_id("job") == "job.rows-00000000-2"
    with pytest.raises(ValueError, match="at least 1"):
        list(packs(rows, 0))


def test_texts_stack_into_one_bytes_tensor() -> None:
    rows = _rows(["a short text", "another", "third one"], name="text")
    (pack,) = packs(rows, 8)
    (tensor,) = pack.inputs()
    assert tensor == {"name": "text", "datatype": "BYTES", "shape": [3],
                      "data": ["a short text", "another", "third one"]}


def test_split_outputs_give_each_row_what_a_one_row_answer_holds() -> None:
    outputs = [
        {"name": "label", "shape": [3], "datatype": "INT64", "data": [7, 1, 4]},
        {"name": "probabilities", "shape": [3, 2], "datatype": "FP32",
         "data": [0.1, 0.9, 0.8, 0.2, 0.3, 0.7]},
    ]
    rows = split_outputs(outputs, 3)
    assert [{t["name"]: output_value(t) for t in r} for r in rows] == [
        {"label": 7, "probabilities": [0.1, 0.9]},
        {"label": 1, "probabilities": [0.8, 0.2]},
        {"label": 4, "probabilities": [0.3, 0.7]},
    ]
    with pytest.raises(ValueError, match=r"shape \[3\], not 2 rows first"):
        split_outputs(outputs[:1], 2)
    with pytest.raises(ValueError, match="holds 5 values, not 6"):
        split_outputs([{**outputs[1], "data": [0.1] * 5}], 3)


def test_a_packed_answer_becomes_one_record_per_row_with_its_share_of_cost() -> None:
    pack = Pack(tuple(BatchRow(i, f"r{i}", {"input": [0.0]}) for i in (5, 6)), ([], []))
    resp = InferenceResponse.model_validate({
        "id": pack.request_id("job"), "model": "digits", "version": "1", "status": "ok",
        "cost_usd": 4e-9,
        "outputs": [{"name": "label", "shape": [2], "datatype": "INT64", "data": [3, 8]}],
    })
    split = split_outputs([t.model_dump() for t in resp.outputs], pack.size)
    recs = [result_record(row, "job", resp, 2.0, outputs=out, cost_usd=resp.cost_usd / 2)
            for row, out in zip(pack.rows, split, strict=True)]
    assert [(r["index"], r["id"], r["outputs"], r["cost_usd"]) for r in recs] == [
        (5, "r5", {"label": 3}, 2e-9), (6, "r6", {"label": 8}, 2e-9)]


def test_a_binary_answer_gives_the_rows_the_same_records_as_a_json_one(tmp_path: Path) -> None:
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)
    labels = np.array([7, 1, 4], dtype=np.int64)
    rows = tuple(BatchRow(i, f"r{i}", {"input": [0.0]}) for i in range(3))

    def records(binary: bool) -> bytes:
        resp = InferenceResponse.model_validate_json(orjson.dumps({
            "id": "p", "model": "digits", "version": "1", "status": "ok", "cost_usd": 3e-9,
            "outputs": [codec.encode("label", labels, binary=binary),
                        codec.encode("probabilities", probs, binary=binary)],
        }, option=orjson.OPT_SERIALIZE_NUMPY))
        split = split_outputs([_fields(t) for t in resp.outputs], 3)
        recs = [result_record(row, "job", resp, 2.0, outputs=out, cost_usd=1e-9)
                for row, out in zip(rows, split, strict=True)]
        path = tmp_path / f"{binary}.jsonl"
        journal = JournalWriter(path)
        journal.write(recs)
        journal.close()
        return path.read_bytes()

    as_json, as_binary = records(False), records(True)
    assert as_binary == as_json
    first = orjson.loads(as_json.splitlines()[0])
    assert first["outputs"] == {"label": 7, "probabilities": [0.1, 0.9]}


def test_a_base64_answer_that_does_not_decode_is_an_error_not_values() -> None:
    resp = InferenceResponse.model_validate({
        "id": "p", "model": "digits", "status": "ok",
        "outputs": [{"name": "probabilities", "shape": [1, 10], "datatype": "FP32",
                     "data": ["AACAPw=="], "parameters": {"content_type": "base64"}}],
    })
    with pytest.raises(InvalidInput, match=r"it takes 40 bytes, .* decodes to 4"):
        _fields(resp.outputs[0])
