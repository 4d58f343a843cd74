"""agents.cli_status: the table, exit statuses, and a broker that cannot be reached."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.cli import main
from agents.cli_status import StatusReport, collect_status, format_table
from pipeline.broker import free_port
from pipeline.health import ModelHealth
from pipeline.settings import Settings

REGISTRY = """
[models.digits]
default_version = "1"

[[models.digits.versions]]
version = "1"
path = "digits/1/model.onnx"
execution_provider = "cuda"
inputs = [{ name = "input", datatype = "FP32", shape = [-1, 64] }]
outputs = [{ name = "label", datatype = "INT64", shape = [-1] }]
"""


def test_table_has_a_line_per_reason() -> None:
    report = StatusReport(
        healths={
            ("digits", "1"): ModelHealth("healthy", [], False, False, live_workers=("w1",),
                                         reference="first 500 rows"),
            ("minilm", "2"): ModelHealth(
                "down", ["infrastructure: worker g1 (pool gpu) missing (no heartbeat for 12 s)",
                         "infrastructure: no live worker serves minilm:2"], True, False),
        },
        at_ms=0.0,
    )
    lines = format_table(report).splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "REASON"]
    assert lines[1].split()[:3] == ["digits", "1", "healthy"]
    assert "ok (1 workers; drift reference: first 500 rows)" in lines[1]
    assert lines[2].split()[:3] == ["minilm", "2", "down"]
    assert lines[2].endswith("worker g1 (pool gpu) missing (no heartbeat for 12 s)")
    # Further reasons line up under the first.
    assert lines[3].strip() == "infrastructure: no live worker serves minilm:2"
    assert lines[3].index("infrastructure") == lines[2].index("infrastructure")


def test_empty_report_says_why() -> None:
    text = format_table(StatusReport({}, 0.0, errors=["cannot reach the broker"]))
    assert "(no model versions seen" in text
    assert text.endswith("error: cannot reach the broker")


async def test_unreachable_broker_leaves_registry_models_down(tmp_path: Path) -> None:
    registry = tmp_path / "registry.toml"
    registry.write_text(REGISTRY)
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    report = await collect_status(Settings(registry=registry), bootstrap)
    assert len(report.errors) == 1 and "cannot reach the broker" in report.errors[0]
    h = report.healths[("digits", "1")]
    assert h.state == "down" and h.infra and not h.model
    assert h.reasons[0].startswith(
        f"infrastructure: broker error: cannot reach the broker at {bootstrap}")
    assert "infrastructure: no worker has announced digits:1 (no heartbeat seen)" in h.reasons


def test_command_exit_statuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("INFERLINE_BOOTSTRAP_SERVERS", raising=False)
    assert main(["status"]) == 2
    assert "INFERLINE_BOOTSTRAP_SERVERS is not set" in capsys.readouterr().err
    registry = tmp_path / "registry.toml"
    registry.write_text(REGISTRY)
    monkeypatch.setenv("INFERLINE_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("INFERLINE_REGISTRY", str(registry))
    assert main(["status", "--json"]) == 2
    out = capsys.readouterr().out
    assert '"model": "digits"' in out and '"state": "down"' in out
    # A reference file that is not there is a clear error, not a traceback.
    assert main(["status", "--reference", str(tmp_path / "missing.json")]) == 2
    assert "missing.json' does not exist" in capsys.readouterr().err
