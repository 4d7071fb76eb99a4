from __future__ import annotations

import pytest

from tuner.errors import CheckpointError
from tuner.training.checkpoints import (
    find_latest_checkpoint,
    is_complete,
    partial_checkpoints,
    prune_checkpoints,
    publish_checkpoint,
    resolve_resume,
    temporary_checkpoint_dir,
    verify_manifest,
)


def _write_checkpoint(output_dir, step, content=b"weights"):
    temporary = temporary_checkpoint_dir(output_dir, step)
    temporary.mkdir(parents=True)
    (temporary / "model.safetensors").write_bytes(content)
    (temporary / "loop_state.json").write_text(f'{{"step": {step}}}')
    return publish_checkpoint(temporary, step)


def test_interrupted_save_is_ignored_and_reported(tmp_path):
    _write_checkpoint(tmp_path, 3)
    interrupted = temporary_checkpoint_dir(tmp_path, 6)
    interrupted.mkdir()
    (interrupted / "model.safetensors").write_bytes(b"half")

    assert find_latest_checkpoint(tmp_path).name == "step-000003"
    assert partial_checkpoints(tmp_path) == [interrupted]
    assert resolve_resume(tmp_path, "latest").name == "step-000003"


def test_checkpoint_without_manifest_or_with_a_truncated_file_is_incomplete(tmp_path):
    checkpoint = _write_checkpoint(tmp_path, 2)
    assert is_complete(checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"weigh")
    assert not is_complete(checkpoint)
    assert find_latest_checkpoint(tmp_path) is None
    (checkpoint / "manifest.json").unlink()
    assert not is_complete(checkpoint)


def test_verify_manifest_detects_changed_contents(tmp_path):
    checkpoint = _write_checkpoint(tmp_path, 1)
    verify_manifest(checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"WEIGHTS")  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        resolve_resume(tmp_path, checkpoint)


def test_prune_keeps_the_newest_and_never_all(tmp_path):
    for step in (1, 2, 10, 11):
        _write_checkpoint(tmp_path, step)
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000010", "step-000011"]
    prune_checkpoints(tmp_path, keep=0)
    assert find_latest_checkpoint(tmp_path).name == "step-000011"


def test_resume_errors_name_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume(tmp_path, "latest")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(tmp_path, tmp_path / "nope")


def test_resume_latest_falls_back_past_a_corrupted_newest_checkpoint(tmp_path):
    _write_checkpoint(tmp_path, 2)
    newest = _write_checkpoint(tmp_path, 4)
    (newest / "model.safetensors").write_bytes(b"WEIGHTS")  # same size, other bytes
    assert resolve_resume(tmp_path, "latest").name == "step-000002"
    # Named explicitly, a corrupted checkpoint is still refused.
    with pytest.raises(CheckpointError, match="contents differ"):
        resolve_resume(tmp_path, newest)
