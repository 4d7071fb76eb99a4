"""Loss parts (SDXL's instance and prior losses): summed per sample over micro-batches and the log window,
logged as `loss/<name>` beside `loss`."""

from __future__ import annotations

import json

import pytest
import torch

from tuner.data.sampling import GroupedBatchSampler
from tuner.training.loop import LoopSettings, LossParts, run_training

SAMPLES = 12
PRIOR = {0, 1, 2, 7}  # class images: 4 of 12, so batches hold uneven mixes of both kinds


class MixedDataset(torch.utils.data.Dataset):
    """Sample i has the fixed loss `value` (i for instance images, 100 + i for class images)."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        prior = index in PRIOR
        return {
            "x": torch.full((2,), float(index)),
            "value": torch.tensor(100.0 + index if prior else float(index)),
            "prior": torch.tensor(prior),
        }


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def _loss_with_parts(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, LossParts]:
    # Each sample's loss is its value; the model enters at zero weight so there is a gradient to take.
    per_sample = batch["value"] + 0.0 * model(batch["x"]).sum(dim=1)
    prior = batch["prior"]
    parts = {
        "instance": (per_sample[~prior].sum().detach(), (~prior).sum()),
        "prior": (per_sample[prior].sum().detach(), prior.sum()),
    }
    return per_sample.mean(), parts


def _job(toy_job, **fields):
    job = toy_job(loss_fn=_loss_with_parts, **fields)
    job.model = torch.nn.Linear(2, 2)
    job.optimizer = torch.optim.SGD(job.model.parameters(), lr=0.0)
    job.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(job.optimizer, lambda step: 1.0)
    job.dataset = MixedDataset()
    job.collate_fn = _collate
    job.batch_sampler = GroupedBatchSampler([0] * SAMPLES, batch_size=3, seed=5, shuffle=True)
    return job


def test_parts_are_logged_as_the_mean_per_sample_over_the_window(tmp_path, new_accelerator, toy_job) -> None:
    # 4 batches of 3 per epoch, 2 per step: a window of 4 steps sees every sample twice.
    job = _job(toy_job, loss_parts=("instance", "prior"))
    run_training(job, LoopSettings(max_steps=4, grad_accum=2, log_every=4), new_accelerator(), tmp_path)

    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    instance = [float(i) for i in range(SAMPLES) if i not in PRIOR]
    prior = [100.0 + i for i in PRIOR]
    # Per sample, not the mean of the batches' means (batches hold 0 to 3 of each kind).
    assert record["loss/instance"] == pytest.approx(sum(instance) / len(instance), rel=1e-6)
    assert record["loss/prior"] == pytest.approx(sum(prior) / len(prior), rel=1e-6)
    assert record["loss"] == pytest.approx((sum(instance) + sum(prior)) / SAMPLES, rel=1e-6)


def test_a_window_without_class_images_leaves_their_part_out(tmp_path, new_accelerator, toy_job) -> None:
    job = _job(toy_job, loss_parts=("instance", "prior"))
    job.batch_sampler = GroupedBatchSampler(
        [0 if i in PRIOR else 1 for i in range(SAMPLES)], batch_size=4, seed=5, shuffle=False
    )
    run_training(job, LoopSettings(max_steps=3, log_every=1), new_accelerator(), tmp_path)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = [sorted(key for key in record if key.startswith("loss/")) for record in records]
    assert kinds == [["loss/prior"], ["loss/instance"], ["loss/instance"]]


def test_a_job_without_parts_logs_the_loss_alone(tmp_path, new_accelerator, toy_job) -> None:
    run_training(toy_job(), LoopSettings(max_steps=2, log_every=1), new_accelerator(), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and not any(key.startswith("loss/") for record in records for key in record)


def test_parts_history_survives_a_resume_for_the_loss_plot(tmp_path, new_accelerator, toy_job) -> None:
    settings = LoopSettings(max_steps=4, log_every=1, checkpoint_every=2)
    straight = _job(toy_job, loss_parts=("instance", "prior"))
    run_training(straight, settings, new_accelerator(), tmp_path / "straight")
    split = _job(toy_job, loss_parts=("instance", "prior"))
    run_training(
        split, LoopSettings(max_steps=2, log_every=1, checkpoint_every=2), new_accelerator(), tmp_path / "r"
    )
    run_training(
        _job(toy_job, loss_parts=("instance", "prior")),
        settings,
        new_accelerator(),
        tmp_path / "r",
        resume="latest",
    )

    def history(folder):
        state = json.loads((folder / "checkpoints" / "step-000004" / "loop_state.json").read_text())
        return state["part_losses"]

    expected = history(tmp_path / "straight")
    assert set(expected) == {"instance", "prior"} and len(expected["instance"]) >= 3
    assert history(tmp_path / "r") == expected
    assert (tmp_path / "r" / "loss.png").stat().st_size > 0
