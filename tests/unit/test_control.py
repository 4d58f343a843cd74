"""Control topic records and the view's bookkeeping, without a broker."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.batchjob import control_key
from pipeline.control import (
    ControlView,
    Decision,
    DeploymentState,
    VersionReadiness,
    WorkerReadiness,
    encode_record,
    parse_record,
)
from pipeline.rollout import Figures
from pipeline.settings import Settings


def _view(tmp_path: Path) -> ControlView:
    s = Settings(topic_prefix="ut", model_dir=tmp_path, control_expiry_ms=1000)
    return ControlView(s, "127.0.0.1:1")


def _worker(wid: str, at_ms: int, *, warm: bool = True, state: str = "ready") -> WorkerReadiness:
    return WorkerReadiness(
        worker_id=wid, pool="default", state=state,  # type: ignore[arg-type]
        versions=[VersionReadiness(model="digits", version="1", warm=warm,
                                   execution_provider="CPUExecutionProvider", warmup_ms=3.5)],
        heartbeat_ms=100, at_ms=at_ms,
    )


def test_records_round_trip_with_their_keys() -> None:
    records = [
        _worker("w1", 1000),
        DeploymentState(model="digits", stable="1", candidate="2", canary_percent=5,
                        shadow_percent=10, state="canary", rollout_id="abc"),
        Decision(model="digits", seq=3, action="rollback", stable="1", candidate="2",
                 reason="agreement 0.1", figures=Figures(pairs=20, agreement=0.1)),
    ]
    for record in records:
        _, value = encode_record(record)
        assert parse_record(value) == record
    assert [encode_record(r)[0] for r in records] == [
        b"worker:w1", b"deployment:digits", b"decision:digits:3"]


def test_unknown_kind_is_invalid() -> None:
    with pytest.raises(ValidationError):
        parse_record(b'{"kind": "nonsense"}')


def test_view_keeps_the_latest_record_per_key_and_ignores_invalid(tmp_path: Path) -> None:
    view = _view(tmp_path)
    for r in (_worker("w1", 1000, warm=False), _worker("w1", 1100)):
        view.apply(*encode_record(r))
    view.apply(b"worker:junk", b"not json")
    assert view.invalid == 1 and view.revision == 2
    assert view.warm_workers("digits", "1", at_ms=1200) == ["w1"]
    view.apply(b"worker:w1", None)  # a tombstone deletes
    assert view.workers(at_ms=1200, include_gone=True) == []


def test_view_passes_over_batch_job_status_records(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                  ) -> None:
    """Jobs publish their progress on the control topic; the view neither keeps nor
    counts those as invalid, and says nothing about them."""
    view = _view(tmp_path)
    view.apply(*encode_record(_worker("w1", 1000)))
    caplog.set_level("WARNING", logger="inferline.control")
    view.apply(control_key("nightly-7"), b'{"job_id": "nightly-7", "state": "running"}')
    view.apply(control_key("nightly-7"), None)
    assert view.invalid == 0 and view.revision == 1
    assert list(view.records) == ["worker:w1"]
    assert not caplog.records
    view.apply(b"jobless:x", b'{"job_id": "nightly-7"}')
    assert view.invalid == 1


def test_workers_expire_when_their_heartbeat_stops_and_when_stopping(tmp_path: Path) -> None:
    view = _view(tmp_path)
    view.apply(*encode_record(_worker("w1", 10_000)))
    view.apply(*encode_record(_worker("w2", 10_000)))
    assert view.warm_workers("digits", "1", at_ms=10_500) == ["w1", "w2"]
    # Expiry is the larger of the view's setting (1 s) and three of the worker's beats.
    assert view.warm_workers("digits", "1", at_ms=11_001) == []
    view.apply(*encode_record(_worker("w2", 11_000, state="stopping")))
    assert view.warm_workers("digits", "1", at_ms=11_100) == []
    view.apply(*encode_record(_worker("w1", 11_000)))
    assert view.warm_versions(at_ms=11_100) == {"digits": {"1"}}
    assert len(view.workers(at_ms=11_100, include_gone=True)) == 2


def test_deployments_and_decisions(tmp_path: Path) -> None:
    view = _view(tmp_path)
    assert view.deployment("digits") is None and view.next_seq("digits") == 1
    dep = DeploymentState(model="digits", stable="1", candidate="2", canary_percent=5,
                          state="canary", rollout_id="r")
    view.apply(*encode_record(dep))
    for seq, at in ((2, 20), (1, 10)):
        view.apply(*encode_record(Decision(model="digits", seq=seq, action="step",
                                           stable="1", at_ms=at)))
    view.apply(*encode_record(Decision(model="other", seq=9, action="start", stable="1")))
    assert view.deployment("digits") == dep and dep.active
    assert [d.seq for d in view.decisions("digits")] == [1, 2]
    assert view.next_seq("digits") == 3 and view.next_seq("other") == 10
    assert set(view.deployments()) == {"digits"}
