"""The SDXL recipe with class (prior) images on the tiny model: the prior loss is logged apart."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from tuner.config.schema import RunConfig
from tuner.recipes import sdxl as recipe

PRIOR_IMAGES = {"1.png", "4.png"}


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for index, size in enumerate([(64, 64), (72, 64), (64, 64), (64, 72), (64, 64), (70, 64)]):
        Image.new("RGB", size, (40 * index, 120, 200)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a plain colour {index}", encoding="utf-8")
    return folder


@pytest.mark.slow
def test_a_run_with_class_images_logs_instance_and_prior_losses(
    mixed_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    scan = recipe.load_training_portions

    def with_class_images(config: RunConfig):
        # What --reg-data marks; flagged here so the test needs only the recipe.
        return [
            dataclasses.replace(
                portion,
                samples=tuple(
                    dataclasses.replace(sample, prior=Path(sample.image).name in PRIOR_IMAGES)
                    for sample in portion.samples
                ),
            )
            for portion in scan(config)
        ]

    monkeypatch.setattr(recipe, "load_training_portions", with_class_images)
    config = RunConfig.model_validate(
        {
            "task": "sdxl-lora",
            "model": {"name_or_path": "tiny"},
            # No prior_loss_weight: without a reg source in the config it is refused (it would weigh nothing).
            "data": {"path": str(mixed_folder), "resolution": 64},
            "lora": {"rank": 2, "alpha": 2.0},
            "train": {"batch_size": 2, "epochs": 1},
            # One record for the whole epoch: every image, instance and class, is in it.
            "output": {"dir": str(tmp_path / "out"), "log_every": 100, "sample_steps": 1},
            "runtime": {"device": "cpu", "mixed_precision": "no"},
        }
    )
    output = recipe.train_sdxl_lora(config)

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    trained = [record for record in records if "loss" in record]
    assert len(trained) == 1
    record = trained[0]
    assert record["loss/instance"] > 0 and record["loss/prior"] > 0
    assert "prior loss" in (output / "report.html").read_text()
