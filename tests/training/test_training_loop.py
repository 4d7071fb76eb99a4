from __future__ import annotations

import json
import math

import pytest
import torch

from tuner.config.schema import RunConfig
from tuner.errors import CheckpointError
from tuner.training.checkpoints import find_latest_checkpoint
from tuner.training.loop import LoopSettings, NonFiniteLossError, run_training, settings_from_config


def _weights(job) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in job.model.state_dict().items()}


def test_loss_goes_down_and_metrics_and_plot_are_written(tmp_path, new_accelerator, toy_job):
    job = toy_job(dropout=0.0, lr=5e-2)
    settings = LoopSettings(max_steps=24, log_every=4)

    result = run_training(job, settings, new_accelerator(), tmp_path)

    assert result.step == 24 and not result.stopped_early
    assert [step for step, _ in result.losses] == [4, 8, 12, 16, 20, 24]
    assert result.losses[-1][1] < 0.3 * result.losses[0][1]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
    assert [r["loss"] for r in records] == pytest.approx([loss for _, loss in result.losses])
    assert records[-1]["epoch"] == pytest.approx(24 / 8)  # 16 samples in batches of 2
    assert all(r["lr"] == pytest.approx(5e-2) and r["samples_per_s"] > 0 for r in records)
    assert all(r["peak_memory_mb"] > 0 for r in records)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_grad_accumulation_equals_one_large_batch(tmp_path, new_accelerator, toy_job):
    accumulated = toy_job(batch_size=2, groups=1, shuffle=False, dropout=0.0, optimizer="sgd", lr=0.1)
    run_training(accumulated, LoopSettings(max_steps=3, grad_accum=3), new_accelerator(), tmp_path / "a")
    large = toy_job(batch_size=6, groups=1, shuffle=False, dropout=0.0, optimizer="sgd", lr=0.1)
    run_training(large, LoopSettings(max_steps=3), new_accelerator(), tmp_path / "b")

    for name, value in _weights(large).items():
        torch.testing.assert_close(_weights(accumulated)[name], value, atol=1e-6, rtol=0)
    assert not torch.equal(_weights(large)["up.weight"], toy_job().model.up.weight)  # it trained


class Interrupted(Exception):
    pass


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, new_accelerator, toy_job):
    # 16 samples in 2 groups, batches of 2, grad_accum 2: 4 steps per epoch, so the checkpoint at
    # step 3 is mid-epoch and the resumed run crosses into epoch 1.
    settings = LoopSettings(max_steps=6, grad_accum=2, log_every=1, checkpoint_every=3, ema_decay=0.9)
    job_kwargs = {"scheduler": "cosine", "warmup_steps": 2, "total_steps": 6}
    uninterrupted_job = toy_job(**job_kwargs)
    uninterrupted = run_training(uninterrupted_job, settings, new_accelerator(), tmp_path / "uninterrupted")

    crashing_job = toy_job(**job_kwargs)
    micro_steps = 0

    def crash_after_step_3(model, batch, loss_fn=crashing_job.loss_fn):  # a kill mid step 4
        nonlocal micro_steps
        micro_steps += 1
        if micro_steps > 3 * 2 + 1:
            raise Interrupted
        return loss_fn(model, batch)

    crashing_job.loss_fn = crash_after_step_3
    with pytest.raises(Interrupted):
        run_training(crashing_job, settings, new_accelerator(), tmp_path / "r")
    assert find_latest_checkpoint(tmp_path / "r").name == "step-000003"

    resumed_job = toy_job(**job_kwargs)  # fresh model, optimizer and schedule, as in a new process
    resumed = run_training(resumed_job, settings, new_accelerator(), tmp_path / "r", resume="latest")

    assert resumed.step == 6 and resumed.epoch == 1
    for name, value in _weights(uninterrupted_job).items():
        assert torch.equal(_weights(resumed_job)[name], value), name
    assert resumed.losses == uninterrupted.losses
    assert resumed.ema_state.keys() == {"down.weight", "up.weight"}
    for name, value in uninterrupted.ema_state.items():
        assert torch.equal(resumed.ema_state[name], value), name
    assert resumed_job.lr_scheduler.get_last_lr() == uninterrupted_job.lr_scheduler.get_last_lr()
    # Only the LoRA weights go into a checkpoint; the frozen base comes from the model.
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "r" / "checkpoints" / "step-000006" / "model.safetensors")
    assert saved.keys() == {"down.weight", "up.weight"}


def test_resume_latest_without_checkpoint_is_a_checkpoint_error(tmp_path, new_accelerator, toy_job):
    with pytest.raises(CheckpointError) as error:
        run_training(toy_job(), LoopSettings(max_steps=2), new_accelerator(), tmp_path, resume="latest")
    assert "checkpoint_every" in error.value.hint


def test_retention_keeps_the_last_checkpoints(tmp_path, new_accelerator, toy_job):
    settings = LoopSettings(max_steps=5, checkpoint_every=1, keep_checkpoints=2)
    run_training(toy_job(), settings, new_accelerator(), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


def test_nonfinite_steps_are_skipped_then_training_stops(tmp_path, new_accelerator, toy_job):
    job = toy_job()
    calls = 0

    def nan_at_step_2_and_from_step_5(model, batch, loss_fn=job.loss_fn):
        nonlocal calls
        calls += 1
        loss = loss_fn(model, batch)
        return loss * math.nan if calls == 2 or calls >= 5 else loss

    job.loss_fn = nan_at_step_2_and_from_step_5
    settings = LoopSettings(
        max_steps=20, log_every=1, checkpoint_every=1, keep_checkpoints=1, max_nonfinite=3
    )
    with pytest.raises(NonFiniteLossError) as error:
        run_training(job, settings, new_accelerator(), tmp_path)

    result = error.value.result
    # Step 2 was skipped and training went on; steps 5, 6, 7 were skipped in a row, so it stopped.
    assert result.stopped_early and result.step == 7
    assert [step for step, _ in result.losses] == [1, 3, 4]
    assert "lr" in str(error.value) and "VAE" in str(error.value)
    assert all(torch.isfinite(p).all() for p in job.model.parameters())
    assert find_latest_checkpoint(tmp_path).name == "step-000004"  # the last good one is kept
    assert job.lr_scheduler.last_epoch == 3  # the schedule moved only for the steps taken


def test_validation_and_samples_leave_training_unchanged(tmp_path, new_accelerator, toy_job):
    plain = toy_job()
    run_training(plain, LoopSettings(max_steps=4), new_accelerator(), tmp_path / "plain")

    sampled_at = []

    def sample(step, samples_dir):
        assert not torch.is_grad_enabled() and not job.model.training
        torch.rand(100)  # sampling draws noise: must not shift training's RNG
        sampled_at.append(step)
        (samples_dir / f"{step}.txt").write_text("sample")

    job = toy_job(sample_fn=sample, validation_batches=[{"x": torch.ones(2, 6), "y": torch.zeros(2, 6)}])
    settings = LoopSettings(max_steps=4, log_every=1, sample_every=3, validate_every=2)
    result = run_training(job, settings, new_accelerator(), tmp_path / "extra")

    assert sampled_at == [3, 4]
    assert (tmp_path / "extra" / "samples" / "4.txt").exists()
    assert [step for step, _ in result.validation_losses] == [2, 4]
    assert job.model.training
    for name, value in _weights(plain).items():
        assert torch.equal(_weights(job)[name], value), name
    records = [json.loads(line) for line in (tmp_path / "extra" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "validation_loss" in r] == [2, 4]


def test_evaluation_is_logged_and_the_best_checkpoint_is_kept(tmp_path, new_accelerator, toy_job):
    plain = toy_job()
    run_training(plain, LoopSettings(max_steps=8), new_accelerator(), tmp_path / "plain")
    scores = iter([0.2, 0.7, 0.4, 0.5])  # best at the second evaluation, step 4

    def evaluate(step):
        assert not torch.is_grad_enabled() and not job.model.training
        torch.rand(100)  # generation may draw: must not shift training's RNG
        return {"anls": next(scores), "exact_match": 0.0}

    job = toy_job(eval_fn=evaluate)
    settings = LoopSettings(
        max_steps=8, log_every=1, eval_every=2, checkpoint_every=3, keep_checkpoints=1, keep_best="eval/anls"
    )
    result = run_training(job, settings, new_accelerator(), tmp_path / "run")

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [(r["step"], r["eval/anls"]) for r in records if "eval/anls" in r]
    assert evaluated == [(2, 0.2), (4, 0.7), (6, 0.4), (8, 0.5)]
    # Saved at step 4 although checkpoint_every is 3, and never pruned; the newest one is kept too.
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000004", "step-000008"]
    assert result.best_checkpoint == tmp_path / "run" / "checkpoints" / "step-000004"
    for name, value in _weights(plain).items():
        assert torch.equal(_weights(job)[name], value), name


def test_keep_best_by_validation_loss_keeps_the_lowest(tmp_path, new_accelerator, toy_job):
    job = toy_job(validation_batches=[{"x": torch.ones(2, 6), "y": torch.zeros(2, 6)}])
    settings = LoopSettings(
        max_steps=6, validate_every=1, checkpoint_every=6, keep_checkpoints=1, keep_best="validation_loss"
    )
    result = run_training(job, settings, new_accelerator(), tmp_path)
    best_step = min(result.validation_losses, key=lambda pair: pair[1])[0]
    assert result.best_checkpoint == tmp_path / "checkpoints" / f"step-{best_step:06d}"
    assert result.best_checkpoint.is_dir() and (tmp_path / "checkpoints" / "step-000006").is_dir()


def test_settings_from_config_counts_epochs_in_optimizer_steps():
    config = RunConfig()
    config.train.grad_accum = 3
    config.train.epochs = 2
    # 10 batches: steps of 3, 3, 3 and a last one of 1 at the end of each epoch.
    assert settings_from_config(config, batches_per_epoch=10).max_steps == 8
    assert settings_from_config(config, batches_per_epoch=10, num_processes=2).max_steps == 4
    config.train.epochs = None
    assert settings_from_config(config, batches_per_epoch=10).max_steps == 4
    config.train.max_steps = 7
    config.output.checkpoint_every = 5
    settings = settings_from_config(config, batches_per_epoch=10)
    assert (settings.max_steps, settings.grad_accum, settings.checkpoint_every) == (7, 3, 5)


@pytest.mark.parametrize(
    ("device_type", "asked", "pinned"), [("npu", None, False), ("npu", True, True), ("cuda", None, True)]
)
def test_the_data_loader_pins_batches_on_npu_only_when_data_pin_memory_asks(
    toy_job, device_type, asked, pinned
):
    from types import SimpleNamespace

    from tuner.training.loop import _data_loader

    # Only the device type of the accelerator is read: an NPU one is described, not needed.
    accelerator = SimpleNamespace(device=SimpleNamespace(type=device_type))
    loader = _data_loader(toy_job(pin_memory=asked), LoopSettings(max_steps=1), accelerator)
    assert loader.pin_memory is pinned
