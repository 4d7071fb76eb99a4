"""A toy job for the loop's robustness paths: a frozen Linear plus a trainable low-rank pair."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from tuner.data.sampling import GroupedBatchSampler
from tuner.training.loop import TrainingJob
from tuner.training.optim import build_lr_scheduler, build_optimizer


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, size: int = 12) -> None:
        generator = torch.Generator().manual_seed(7)
        self.inputs = torch.randn(size, 4, generator=generator)
        self.unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict:
        if index in self.unreadable:
            raise OSError(2, "No such file or directory", f"/data/{index}.png")
        return {"x": self.inputs[index]}


def collate(items: list[dict]) -> dict:
    return {"x": torch.stack([item["x"] for item in items])}


def make_job(loss_fn=None, dataset: ToyDataset | None = None) -> TrainingJob:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False), torch.nn.Linear(2, 4, bias=False))
    dataset = dataset or ToyDataset()
    optimizer = build_optimizer("adamw", list(model.parameters()), lr=1e-2, weight_decay=0.0)
    return TrainingJob(
        model=model,
        loss_fn=loss_fn or (lambda m, batch: (m(batch["x"]) - batch["x"]).pow(2).mean()),
        dataset=dataset,
        batch_sampler=GroupedBatchSampler([0] * len(dataset), 2, seed=1),
        collate_fn=collate,
        optimizer=optimizer,
        lr_scheduler=build_lr_scheduler(optimizer, "constant", 0, 100),
    )


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
