"""A toy LoRA-shaped job for the training loop: frozen base Linear, trainable low-rank pair, dropout."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from tuner.data.sampling import GroupedBatchSampler
from tuner.training.loop import TrainingJob
from tuner.training.optim import build_lr_scheduler, build_optimizer

FEATURES = 6


class ToyLora(torch.nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.base = torch.nn.Linear(FEATURES, FEATURES)
        self.base.requires_grad_(False)
        self.down = torch.nn.Linear(FEATURES, 2, bias=False)
        self.up = torch.nn.Linear(2, FEATURES, bias=False)
        torch.nn.init.normal_(self.up.weight, std=0.1)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(self.dropout(x)))


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, size: int) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.inputs = torch.randn(size, FEATURES, generator=generator)
        target_map = torch.randn(FEATURES, FEATURES, generator=generator)
        self.targets = self.inputs @ target_map

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([s[0] for s in samples]), "y": torch.stack([s[1] for s in samples])}


def mse_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


@pytest.fixture
def new_accelerator() -> Callable[..., Accelerator]:
    """A fresh Accelerator on CPU, as a new process would have: Accelerate's state is a singleton."""

    def make(**kwargs) -> Accelerator:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return Accelerator(cpu=True, **kwargs)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def toy_job() -> Callable[..., TrainingJob]:
    def make(
        *,
        samples: int = 16,
        groups: int = 2,
        batch_size: int = 2,
        shuffle: bool = True,
        dropout: float = 0.2,
        optimizer: str = "adamw",
        lr: float = 1e-2,
        scheduler: str = "constant",
        warmup_steps: int = 0,
        total_steps: int = 100,
        loss_fn: Callable = mse_loss,
        **job_fields,
    ) -> TrainingJob:
        torch.manual_seed(0)
        model = ToyLora(dropout)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = build_optimizer(optimizer, trainable, lr=lr, weight_decay=0.0)
        return TrainingJob(
            model=model,
            loss_fn=loss_fn,
            dataset=ToyDataset(samples),
            batch_sampler=GroupedBatchSampler(
                [i % groups for i in range(samples)], batch_size, seed=3, shuffle=shuffle
            ),
            collate_fn=collate,
            optimizer=opt,
            lr_scheduler=build_lr_scheduler(opt, scheduler, warmup_steps, total_steps),
            **job_fields,
        )

    return make
