"""scripts/setup.sh refuses a Python older than pyproject.toml's requires-python, in one line."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The files setup.sh reads before it installs anything, in a folder without a venv."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    for name in ("pyproject.toml", "requirements-lock.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def _python_reporting(path: Path, version: str) -> Path:
    """A stand-in interpreter that answers setup.sh's version question with `version`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def _setup(checkout: Path, python: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(checkout / "scripts" / "setup.sh")],
        env={"PATH": "/usr/bin:/bin", "PYTHON": python},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_older_python_gets_one_line_naming_the_version_needed(checkout: Path) -> None:
    needed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert needed == ">=3.11"  # what the locked set needs (transformers 5.25, the lock's own Python)
    old = _python_reporting(checkout / "bin" / "python3.10", "3.10")
    result = _setup(checkout, str(old))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"setup: tuner needs Python >= 3.11 (requires-python), {old} is 3.10: run it with PYTHON=python3.11 "
        "or newer"
    ]
    assert not (checkout / ".venv").exists()  # refused before any venv was made


def test_an_old_venv_is_named_and_a_missing_interpreter_is_refused(checkout: Path) -> None:
    _python_reporting(checkout / ".venv" / "bin" / "python", "3.9")
    result = _setup(checkout, "python3")
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        ".venv/bin/python is 3.9: remove .venv and run it with PYTHON=python3.11 or newer"
    )
    shutil.rmtree(checkout / ".venv")
    result = _setup(checkout, str(checkout / "no-such-python"))
    assert result.returncode == 2 and "no-such-python is not runnable" in result.stderr
