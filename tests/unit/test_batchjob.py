"""Batch job records and status, without a broker (the run itself: tests/integration)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from pipeline.batchio import BatchRow
from pipeline.batchjob import (
    JobStatus,
    _pending_rows,
    _write_atomic,
    control_key,
    failure_record,
    load_status,
    outcome_key,
    result_record,
    state_file,
)
from pipeline.errors import InvalidRequest
from pipeline.settings import Settings
from schemas.messages import InferenceResponse


def test_result_record_of_an_answer() -> None:
    resp = InferenceResponse.model_validate({
        "id": "r", "model": "digits", "version": "1", "status": "ok", "cost_usd": 2e-9,
        "outputs": [{"name": "label", "shape": [1], "datatype": "INT64", "data": [4]},
                    {"name": "probabilities", "shape": [1, 2], "datatype": "FP32",
                     "data": [0.25, 0.75]}],
    })
    rec = result_record(BatchRow(3, "r", {"input": [0]}), "job", resp, 12.5)
    assert rec["outputs"] == {"label": 4, "probabilities": [0.25, 0.75]}
    assert (rec["index"], rec["id"], rec["job_id"], rec["status"]) == (3, "r", "job", "ok")
    assert rec["error"] is None and rec["cost_usd"] == 2e-9 and outcome_key(rec) == "ok"

    bad = InferenceResponse.model_validate({
        "id": "r", "model": "digits", "status": "error",
        "error": {"code": "INVALID_INPUT", "message": "shape [1, 10] is not [-1, 64]"},
    })
    rec = result_record(BatchRow(4, "r"), "job", bad, 1.0)
    assert rec["outputs"] is None and outcome_key(rec) == "error:INVALID_INPUT"
    rec = failure_record(BatchRow(5, "s"), "job", "digits", None, "CLIENT_TIMEOUT", "late")
    assert outcome_key(rec) == "error:CLIENT_TIMEOUT" and rec["index"] == 5


def test_pending_rows_skip_done_ids_and_refuse_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "input": [1]}\n{"input": [2]}\n{"id": "c", "input": [3]}\n')
    rows = _pending_rows(path, "j", ["input"], {"a": {}})
    assert [r.index for r in rows] == [1, 2]
    path.write_text('{"id": "a", "input": [1]}\n{"id": "a", "input": [2]}\n')
    with pytest.raises(InvalidRequest, match=r"rows 0 and 1 .* share the id 'a'"):
        _pending_rows(path, "j", ["input"], {})


async def test_status_round_trips_through_the_state_file(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    assert await load_status(settings, "nope") is None
    st = JobStatus(job_id="j1", model="digits", version=None, input="in.jsonl",
                   output="out.jsonl", state="failed", total=10, done=10, ok=9, failed=1,
                   cost_usd=1e-6, counts={"ok": 9, "error:INVALID_INPUT": 1}, updated_at=5.0)
    _write_atomic(state_file(settings, "j1"), st.to_json())
    assert state_file(settings, "j1") == tmp_path / "jobs" / "j1.json"
    assert await load_status(settings, "j1") == st
    # Records from a newer inferline may carry more keys.
    assert JobStatus.from_json(orjson.dumps({**orjson.loads(st.to_json()), "new": 1})) == st
    with pytest.raises(InvalidRequest):
        JobStatus.from_json(b"[1]")
    assert control_key("j1") == b"job:j1"
