"""The loop under stress: a full disk while checkpointing, a stop signal, a divergence, a file that
disappears mid-run."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.robustness.conftest import ToyDataset, make_job
from tuner.errors import CheckpointError
from tuner.training.checkpoints import complete_checkpoints, find_latest_checkpoint, verify_manifest
from tuner.training.loop import LoopSettings, NonFiniteLossError, run_training
from tuner.training.signals import TrainingInterrupted


def test_disk_full_while_checkpointing_names_the_path_and_keeps_the_previous_checkpoint(
    tmp_path: Path, accelerator, monkeypatch
) -> None:
    original = accelerator.save_state

    def save_state(output_dir: str, **kwargs):
        if "step-000004" in output_dir:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return original(output_dir, **kwargs)

    monkeypatch.setattr(accelerator, "save_state", save_state)
    settings = LoopSettings(max_steps=6, checkpoint_every=2, keep_checkpoints=1, log_every=1)
    with pytest.raises(CheckpointError) as error:
        run_training(make_job(), settings, accelerator, tmp_path)
    assert "step-000004" in error.value.message and "No space left" in error.value.message
    assert "disk space" in error.value.hint
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["step-000002"]
    verify_manifest(tmp_path / "checkpoints" / "step-000002")
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_sigterm_finishes_the_step_checkpoints_and_exits_143(tmp_path: Path, accelerator) -> None:
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return (model(batch["x"]) - batch["x"]).pow(2).mean()

    settings = LoopSettings(max_steps=10, checkpoint_every=0, log_every=1)
    with pytest.raises(TrainingInterrupted) as error:
        run_training(make_job(loss_fn), settings, accelerator, tmp_path)
    assert error.value.exit_code == 143
    assert "--resume latest" in error.value.hint
    assert find_latest_checkpoint(tmp_path).name == "step-000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_divergence_without_checkpoints_ends_with_one_from_before_it(tmp_path: Path, accelerator) -> None:
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = (model(batch["x"]) - batch["x"]).pow(2).mean()
        return loss * float("nan") if len(calls) > 2 else loss

    settings = LoopSettings(max_steps=20, checkpoint_every=0, max_nonfinite=3, log_every=1)
    job = make_job(loss_fn)
    with pytest.raises(NonFiniteLossError) as error:
        run_training(job, settings, accelerator, tmp_path)
    checkpoint = find_latest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.name in error.value.message
    assert "fp16" in error.value.message and "learning rate" in error.value.message
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in saved.values())
    assert torch.equal(saved["0.weight"], job.model[0].weight.detach())  # the weights after step 2


def test_a_file_that_disappears_mid_run_is_skipped_and_logged(tmp_path: Path, accelerator) -> None:
    dataset = ToyDataset()
    dataset.unreadable = {3, 4}
    settings = LoopSettings(max_steps=8, log_every=1)
    result = run_training(make_job(dataset=dataset), settings, accelerator, tmp_path)
    assert result.step == 8
    records = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert {record["index"] for record in records} == {3, 4}
    assert all("/data/" in record["why"] for record in records)
