"""What a resume does besides restoring state: it keeps the lr schedule's length unless asked to stretch
it, a finished run can be trained further, and rolling back to an older checkpoint starts a new timeline
that retention never deletes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from tests.robustness.conftest import make_job
from tuner.training.checkpoints import complete_checkpoints, find_latest_checkpoint
from tuner.training.loop import LoopSettings, run_training
from tuner.training.optim import build_lr_scheduler

LR = 1e-2  # make_job's


def fresh_accelerator() -> Accelerator:
    """A new Accelerator, as a resumed run in a new process has (one prepared model per run)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=True)


def cosine_job(total_steps: int):
    job = make_job()
    job.lr_scheduler = build_lr_scheduler(job.optimizer, "cosine", 0, total_steps)
    return job


def logged_lr(output: Path, step: int) -> float:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return next(record["lr"] for record in records if record.get("step") == step and "lr" in record)


def cosine(step: int, total: int) -> float:
    return LR * 0.5 * (1 + math.cos(math.pi * step / total))


@pytest.mark.parametrize("extend", [False, True])
def test_resuming_with_more_steps_keeps_or_stretches_the_schedule(tmp_path, accelerator, capsys, extend):
    # A run planned for 10 steps that stopped after 6 (its final checkpoint), resumed to 20 steps.
    run_training(cosine_job(10), LoopSettings(max_steps=6, log_every=1), accelerator, tmp_path)
    assert find_latest_checkpoint(tmp_path).name == "step-000006"  # written with checkpoint_every 0
    settings = LoopSettings(max_steps=20, log_every=1, extend_schedule=extend)
    run_training(cosine_job(20), settings, fresh_accelerator(), tmp_path, resume="latest")
    printed = capsys.readouterr().out
    assert "cosine over 10 steps" in printed
    if extend:
        assert "stretched to 20 steps" in printed
        # From step 6 on, the curve of a 20-step schedule.
        assert logged_lr(tmp_path, 7) == pytest.approx(cosine(7, 20))
    else:
        assert "train.extend_schedule=true" in printed
        # The 10-step curve goes on (to 0 at step 10), instead of jumping back up a 20-step one.
        assert logged_lr(tmp_path, 7) == pytest.approx(cosine(7, 10))
        assert logged_lr(tmp_path, 12) == pytest.approx(0.0)


def test_rolling_back_keeps_the_new_timeline_and_sets_the_old_one_aside(tmp_path, accelerator, capsys):
    first = LoopSettings(max_steps=6, checkpoint_every=2, keep_checkpoints=2, log_every=1)
    run_training(make_job(), first, accelerator, tmp_path)
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["step-000004", "step-000006"]

    # Back to step 4, then 1 step with a checkpoint: pruning to 2 used to keep 4 and 6 and delete 5.
    again = LoopSettings(max_steps=5, checkpoint_every=1, keep_checkpoints=2, log_every=1)
    rollback = tmp_path / "checkpoints" / "step-000004"
    run_training(make_job(), again, fresh_accelerator(), tmp_path, resume=rollback)
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["step-000004", "step-000005"]
    assert find_latest_checkpoint(tmp_path).name == "step-000005"
    aside = tmp_path / "checkpoints" / "abandoned-after-step-000004" / "step-000006"
    assert aside.is_dir()
    assert "moved step-000006 aside" in capsys.readouterr().out


def test_device_rng_states_accelerate_leaves_out_are_checkpointed_and_restored(
    tmp_path, accelerator, monkeypatch
):
    # Accelerate 1.15 saves the CPU/CUDA/XPU generators only; on Ascend the loop saves the NPU's.
    import tuner.training.loop as loop

    state = [torch.tensor([7, 8, 9], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(loop, "device_rng_state", lambda device: state)
    monkeypatch.setattr(loop, "restore_device_rng_state", lambda device, states: restored.append(states))
    run_training(make_job(), LoopSettings(max_steps=2, log_every=1), accelerator, tmp_path)
    run_training(make_job(), LoopSettings(max_steps=3, log_every=1), fresh_accelerator(), tmp_path, "latest")
    assert len(restored) == 1 and torch.equal(restored[0][0], state[0])
