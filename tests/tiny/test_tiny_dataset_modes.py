"""The generated tiny datasets are folders like any other: the user's umask decides who can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tuner.tiny.datasets import build_tiny_dataset


def test_a_tiny_dataset_folder_gets_the_umask_modes_not_mkdtemps(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        folder = build_tiny_dataset("sdxl", tmp_path)
    finally:
        os.umask(previous)
    paths = [folder, *folder.rglob("*")]
    assert any(path.suffix == ".png" for path in paths)
    wrong = [
        path for path in paths if stat.S_IMODE(path.stat().st_mode) != (0o750 if path.is_dir() else 0o640)
    ]
    assert wrong == []
    assert build_tiny_dataset("sdxl", tmp_path) == folder
    assert [path.name for path in tmp_path.iterdir()] == [folder.name]
