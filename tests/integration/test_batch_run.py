"""Batch jobs through the running pipeline: order, resume, failures, status."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from pipeline.batchio import (
    derive_row_id,
    journal_path,
    read_records,
    write_parquet_rows,
)
from pipeline.batchjob import BatchJob, BatchJobConfig, JobStatus, load_status, state_file
from pipeline.client import InferenceClient
from pipeline.registry import Registry
from pipeline.session import ModelSession
from tests.integration.conftest import ROOT, Pipeline, cli_env


def _predict(p: Pipeline, x: np.ndarray[Any, Any]) -> list[int]:
    """Labels the model gives in-process, with ONNX Runtime directly."""
    spec = Registry.load(p.settings.registry_path).resolve("digits")
    with ModelSession(spec, provider="cpu") as session:
        return [int(v) for v in session.run({"input": x})["label"]]


def _specs(p: Pipeline) -> dict[str, Any]:
    return {s.name: s for s in Registry.load(p.settings.registry_path).resolve("digits").inputs}


def _rows(x: np.ndarray[Any, Any], n: int) -> tuple[np.ndarray[Any, Any], list[Any]]:
    """``n`` rows cycling over ``x``, in the three input forms by turns."""
    xs = np.stack([x[i % len(x)] for i in range(n)]).astype(np.float32)
    rows: list[Any] = []
    for i, row in enumerate(xs.tolist()):
        rows.append([row, {"input": row}, {"id": f"given-{i}", "inputs": {"input": row}}][i % 3])
    return xs, rows


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


async def _run(p: Pipeline, config: BatchJobConfig) -> tuple[JobStatus, int]:
    """Run a job with a client of its own; returns its status and the requests sent."""
    async with InferenceClient(
        p.settings, bootstrap_servers=p.bootstrap, max_in_flight=config.max_in_flight
    ) as client:
        status = await BatchJob(p.settings, client, config, specs=_specs(p)).run()
        return status, client.submitted


async def test_job_labels_match_the_model_in_input_order(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    n = 300
    xs, rows = _rows(pipeline.x, n)
    src = _write_jsonl(tmp_path / "digits.jsonl", rows)
    out = tmp_path / "out.jsonl"
    # Few in flight and a small reorder window: answers overtake each other and the
    # job has to hold them back. Rows go eight to a request.
    cfg = BatchJobConfig(job_id="order-1", model="digits", input=src, output=out,
                         max_in_flight=32, reorder_window=2, wait_timeout_s=60,
                         rows_per_request=8)
    status, sent = await _run(pipeline, cfg)

    assert (status.state, status.total, status.done, status.ok, status.failed) == (
        "completed", n, n, n, 0)
    assert (status.sent, sent) == (n, -(-n // 8))
    recs = read_records(out)
    assert [r["index"] for r in recs] == list(range(n))
    expected_ids = [derive_row_id("order-1", i) if i % 3 != 2 else f"given-{i}" for i in range(n)]
    assert [r["id"] for r in recs] == expected_ids
    assert [r["outputs"]["label"] for r in recs] == _predict(pipeline, xs)
    assert all(len(r["outputs"]["probabilities"]) == 10 for r in recs)
    assert {r["job_id"] for r in recs} == {"order-1"}
    assert status.cost_usd > 0
    assert abs(sum(r["cost_usd"] for r in recs) - status.cost_usd) < 1e-12
    assert status.counts == {"ok": n}

    # The status is where a user looks for it: the state file and the control topic.
    assert state_file(pipeline.settings, "order-1").exists()
    from_topic = await load_status(
        pipeline.settings.model_copy(update={"state_dir": tmp_path / "elsewhere"}), "order-1",
        bootstrap_servers=pipeline.bootstrap,
    )
    assert from_topic is not None
    assert (from_topic.state, from_topic.done, from_topic.ok) == ("completed", n, n)


async def test_binary_and_json_answers_write_the_same_output_values(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    n = 96
    xs, rows = _rows(pipeline.x, n)
    src = _write_jsonl(tmp_path / "digits.jsonl", rows)
    outputs = {}
    for binary in (False, True):
        out = tmp_path / f"out-{binary}.jsonl"
        cfg = BatchJobConfig(job_id=f"enc-{binary}", model="digits", input=src, output=out,
                             wait_timeout_s=60, binary_outputs=binary)
        status, _ = await _run(pipeline, cfg)
        assert (status.state, status.ok) == ("completed", n)
        outputs[binary] = [r["outputs"] for r in read_records(out)]
    as_json, as_binary = outputs[False], outputs[True]
    assert [o["label"] for o in as_binary] == [o["label"] for o in as_json] == _predict(
        pipeline, xs)
    # Both write each probability as the shortest decimal of its float32 value; the
    # values may differ in their last bits only where batches were formed differently.
    np.testing.assert_allclose([o["probabilities"] for o in as_binary],
                               [o["probabilities"] for o in as_json], rtol=1e-6, atol=1e-7)
    assert all(type(v) is float for o in as_binary for v in o["probabilities"])


async def test_rerun_sends_only_the_rows_missing_from_a_partial_output(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    n, kept = 200, 80
    xs, rows = _rows(pipeline.x, n)
    expected = _predict(pipeline, xs)
    src = _write_jsonl(tmp_path / "digits.jsonl", rows)
    out = tmp_path / "out.jsonl"
    cfg = BatchJobConfig(job_id="resume-1", model="digits", input=src, output=out,
                         max_in_flight=64, wait_timeout_s=60)
    await _run(pipeline, cfg)
    # A run killed after 80 rows, in the middle of writing the 81st.
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:kept]) + lines[kept][:17])

    status, sent = await _run(pipeline, cfg)
    assert (status.sent, sent) == (n - kept, -(-(n - kept) // cfg.rows_per_request))
    assert (status.skipped, status.done, status.ok, status.state) == (kept, n, n, "completed")
    recs = read_records(out)
    assert [r["index"] for r in recs] == list(range(n))
    assert len({r["id"] for r in recs}) == n
    assert [r["outputs"]["label"] for r in recs] == expected

    # Parquet in and out: a run killed with 50 rows in its journal and no Parquet yet.
    psrc = tmp_path / "digits.parquet"
    write_parquet_rows(psrc, [{"input": row} for row in xs.tolist()])
    pout = tmp_path / "out.parquet"
    pcfg = BatchJobConfig(job_id="resume-2", model="digits", input=psrc, output=pout,
                          wait_timeout_s=60)
    await _run(pipeline, pcfg)
    done = read_records(pout)
    pout.unlink()
    _write_jsonl(journal_path(pout), done[:50])
    status, _ = await _run(pipeline, pcfg)
    assert (status.sent, status.skipped, status.ok) == (n - 50, 50, n)
    assert not journal_path(pout).exists()
    recs = read_records(pout)
    assert [r["index"] for r in recs] == list(range(n))
    assert [r["outputs"]["label"] for r in recs] == expected


async def test_rows_go_alone_when_their_pack_is_too_large_to_send(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    n = 32
    xs, rows = _rows(pipeline.x, n)
    src = _write_jsonl(tmp_path / "digits.jsonl", rows)
    # A row is about 450 bytes, a pack of 16 about 4,500: over this client's limit.
    small = dataclasses.replace(pipeline, settings=pipeline.settings.model_copy(
        update={"max_request_bytes": 3000}))
    cfg = BatchJobConfig(job_id="alone-1", model="digits", input=src,
                         output=tmp_path / "out.jsonl", wait_timeout_s=60, rows_per_request=16)
    status, submitted = await _run(small, cfg)
    assert (status.state, status.ok, status.sent, submitted) == ("completed", n, n, n)
    recs = read_records(cfg.output)
    assert [r["outputs"]["label"] for r in recs] == _predict(pipeline, xs)

    # A reorder window narrower than a pack: rows go one at a time, and the job ends.
    cfg = dataclasses.replace(cfg, job_id="alone-2", output=tmp_path / "out2.jsonl",
                              max_in_flight=1, reorder_window=1)
    status, submitted = await asyncio.wait_for(_run(pipeline, cfg), 120)
    assert (status.state, status.ok, submitted) == ("completed", n, n)


async def _cli(p: Pipeline, *args: str) -> tuple[int, str]:
    env = cli_env(p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents.cli", *args, env=env, cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, output.decode(errors="replace")


async def test_cli_job_with_malformed_rows_exits_non_zero_and_records_them(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    xs, rows = _rows(pipeline.x, 40)
    lines = [orjson.dumps(r) for r in rows]
    lines[7] = orjson.dumps({"id": "short", "input": [1.0] * 10})  # the pipeline refuses it
    # The shape of its neighbours, so sent in a request with them, which the pipeline
    # refuses whole (no FP32 holds 1e39): the job sends that request's rows again alone.
    lines[12] = orjson.dumps({"id": "overflow", "input": [1e39] + [0.0] * 63})
    lines[20] = b'{"input": [1, 2,'  # not JSON: refused before sending
    # Over max_request_bytes: refused by the client, recorded, the job goes on.
    lines[30] = orjson.dumps({"id": "huge", "input": [0.5] * 300_000})
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "mixed-out.jsonl"

    code, text = await _cli(pipeline, "batch", "run", str(src), "--model", "digits",
                            "--out", str(out), "--job-id", "mixed-1", "--wait-timeout-s", "60")
    assert code == 1, text
    assert "error:INVALID_INPUT" in text and "error:INVALID_REQUEST" in text, text
    recs = read_records(out)
    assert [r["index"] for r in recs] == list(range(40))
    by_id = {r["id"]: r for r in recs}
    assert by_id["short"]["status"] == "error"
    assert by_id["short"]["error"]["code"] == "INVALID_INPUT"
    assert "64" in by_id["short"]["error"]["message"]
    assert by_id["overflow"]["error"]["code"] == "INVALID_INPUT"
    assert by_id["overflow"]["latency_ms"] is not None  # answered by the pipeline
    assert recs[20]["error"]["code"] == "INVALID_REQUEST"
    assert by_id["huge"]["error"]["code"] == "INVALID_REQUEST"
    assert "max_request_bytes" in by_id["huge"]["error"]["message"]
    good = [i for i in range(40) if i not in (7, 12, 20, 30)]
    labels = _predict(pipeline, xs)
    assert [recs[i]["outputs"]["label"] for i in good] == [labels[i] for i in good]

    code, text = await _cli(pipeline, "batch", "status", "mixed-1", "--json")
    assert code == 0, text
    st = JobStatus.from_json(text.strip().splitlines()[-1])
    assert (st.state, st.total, st.done, st.ok, st.failed) == ("failed", 40, 40, 36, 4)
    assert st.counts == {"ok": 36, "error:INVALID_INPUT": 2, "error:INVALID_REQUEST": 2}
    # Rows 20 (not JSON) and 30 (too large to send) never went out.
    assert st.sent == 38

    # A rerun has nothing left to send and still reports the failures.
    code, text = await _cli(pipeline, "batch", "run", str(src), "--model", "digits",
                            "--out", str(out))
    assert code == 1, text
    assert "0 now, 0 sent" in text and "job mixed-1" in text, text
