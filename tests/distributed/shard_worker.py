"""Run by torchrun from test_sharding.py: the shared loop on a toy model, recording which samples each
process trains on, per epoch.

Arguments: OUTPUT GROUPS_JSON BATCH_SIZE EPOCHS. Writes `seen-<rank>.json`
({epoch: [[indices of a batch], ...]}) into OUTPUT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from tuner.data.sampling import GroupedBatchSampler, SampleKey
from tuner.training.loop import LoopSettings, TrainingJob, run_training


class IndexedSamples(torch.utils.data.Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        return {
            "x": torch.full((3,), float(key)),
            "index": torch.tensor(int(key)),
            "epoch": torch.tensor(key.epoch),
        }


def main(output: Path, groups: list[int], batch_size: int, epochs: int) -> None:
    accelerator = Accelerator(cpu=True)
    seen: dict[int, list[list[int]]] = {}

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.setdefault(int(batch["epoch"][0]), []).append(batch["index"].tolist())
        return model(batch["x"]).pow(2).mean()

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler = GroupedBatchSampler(groups, batch_size=batch_size, seed=7)
    job = TrainingJob(
        model=model,
        loss_fn=loss_fn,
        dataset=IndexedSamples(len(groups)),
        batch_sampler=sampler,
        collate_fn=torch.utils.data.default_collate,
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0),
    )
    steps_per_epoch = -(-len(sampler) // accelerator.num_processes)
    run_training(job, LoopSettings(max_steps=epochs * steps_per_epoch, log_every=1), accelerator, output)
    (output / f"seen-{accelerator.process_index}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
