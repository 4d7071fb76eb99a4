"""tuner.atomic: outputs appear whole or not at all, with the modes the user's umask gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tuner.atomic import current_umask, give_default_modes, write_atomically, write_folder_atomically


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_safetensors_files_written_atomically_get_the_umask_mode(umask, tmp_path):
    # safetensors 0.8 writes its files 0600 whatever the umask: the reason for give_default_modes.
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert _mode(tmp_path / "plain.safetensors") == 0o600
    path = write_atomically(
        tmp_path / "adapter.safetensors", lambda temporary: save_file({"a": torch.zeros(2)}, str(temporary))
    )
    assert _mode(path) == 0o666 & ~umask
    assert [file.name for file in tmp_path.iterdir()] == sorted(["plain.safetensors", "adapter.safetensors"])


def test_a_folder_is_renamed_into_place_with_every_mode_the_umask_gives(umask, tmp_path):
    def write(staging: Path) -> None:
        (staging / "unet").mkdir()
        save_file({"a": torch.zeros(2)}, str(staging / "unet" / "weights.safetensors"))
        (staging / "config.json").write_text("{}")
        assert not (tmp_path / "merged").exists()  # nothing at the target until the rename

    folder = write_folder_atomically(tmp_path / "merged", write)
    assert _mode(folder) == _mode(folder / "unet") == 0o777 & ~umask
    assert _mode(folder / "unet" / "weights.safetensors") == _mode(folder / "config.json") == 0o666 & ~umask
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


def test_a_failed_write_leaves_nothing_and_replace_keeps_the_old_folder_until_the_new_one_is_whole(tmp_path):
    def fail(temporary: Path) -> None:
        (temporary / "half.bin" if temporary.is_dir() else temporary).write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(tmp_path / "out", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(tmp_path / "file.txt", fail)
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "model"
    old.mkdir()
    (old / "old.txt").write_text("old")
    with pytest.raises(OSError):  # a non-empty folder is not replaced unless asked
        write_folder_atomically(old, lambda staging: (staging / "new.txt").write_text("new"))
    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(old, fail, replace=True)
    assert [path.name for path in old.iterdir()] == ["old.txt"]
    write_folder_atomically(old, lambda staging: (staging / "new.txt").write_text("new"), replace=True)
    assert [path.name for path in old.iterdir()] == ["new.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_give_default_modes_leaves_what_links_point_to_alone(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    outside.chmod(0o600)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "link").symlink_to(outside)
    give_default_modes(folder)
    assert _mode(outside) == 0o600
