"""The `inferline` command line, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.registry import Registry

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("INFERLINE_")}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "agents.cli", *args], env={**base, **env},
        capture_output=True, text=True, timeout=300, check=False,
    )


def test_bad_setting_is_a_clear_error() -> None:
    done = _run(["models", "build"], {"INFERLINE_PARTITIONS": "many"})
    assert done.returncode == 2
    assert "INFERLINE_PARTITIONS='many'" in done.stderr
    assert "Traceback" not in done.stderr


def test_models_build_prints_accuracy_and_writes_the_registry(tmp_path: Path) -> None:
    done = _run(["models", "build"], {"INFERLINE_MODEL_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "built digits:1" in done.stdout and "held-out accuracy 0.9" in done.stdout
    spec = Registry.load(tmp_path / "registry.toml").resolve("digits")
    assert spec.path.is_file() and spec.sha256
    again = _run(["models", "build"], {"INFERLINE_MODEL_DIR": str(tmp_path)})
    assert again.returncode == 0 and "up to date" in again.stdout


def test_serve_without_models_says_how_to_build_them(tmp_path: Path) -> None:
    done = _run(
        ["serve", "--role", "worker"],
        {"INFERLINE_MODEL_DIR": str(tmp_path), "INFERLINE_BOOTSTRAP_SERVERS": "127.0.0.1:1"},
    )
    assert done.returncode == 2
    assert "inferline models build" in done.stderr
