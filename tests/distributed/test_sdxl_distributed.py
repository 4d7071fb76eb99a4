"""SDXL LoRA on 2 processes: the same adapter (and logged instance and prior losses) as 1 process with
twice the batch, one set of output files, and a resume on another process count refused. The data is
what real runs mix: instance images, one with a loss mask, and class images with a prior loss weight.

Why equality can hold: each sample's noise and timestep come from a generator seeded by (seed, sample
index, epoch) (`tuner.distributed.PerSampleSeeds`), DDP averages the two processes' mean gradients,
which is the mean over the 1-process batch, and LoRA starts from the same seeded weights everywhere.
With 4 samples (2 instance, 2 class), each step of both runs sees all 4 (one epoch per step), so the
runs take the same SGD steps up to float rounding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.distributed.conftest import REPO_ROOT, RUN_TIMEOUT_S, process_env
from tuner.config.load import build_config
from tuner.config.schema import RunConfig
from tuner.errors import CheckpointError
from tuner.recipes.sdxl import train_sdxl_lora

STEPS = 3
# fp32 on CPU; the two runs differ only in the order of float additions (DDP's all-reduce).
TOLERANCE = 1e-5


def _captioned_images(folder: Path, colours: list[tuple[int, int, int]]) -> Path:
    folder.mkdir()
    for index, colour in enumerate(colours):
        Image.new("RGB", (64, 64), colour).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a plain colour {index}", encoding="utf-8")
    return folder


def _instance_and_class_images(tmp_path: Path) -> tuple[Path, Path]:
    data = _captioned_images(tmp_path / "data", [(200, 30, 30), (30, 200, 30)])
    (data / "masks").mkdir()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half of image 0 trains
    mask.save(data / "masks" / "0.png")
    return data, _captioned_images(tmp_path / "class", [(30, 30, 200), (200, 200, 30)])


def _settings(data: Path, output: Path, batch_size: int, max_steps: int = STEPS) -> dict[str, object]:
    return {
        "model.name_or_path": "tiny",
        "data.path": str(data),
        "data.resolution": 64,
        "data.masked_loss": True,
        "data.prior_loss_weight": 0.5,
        "output.dir": str(output),
        "output.log_every": 1,
        "output.sample_steps": 1,
        "runtime.device": "cpu",
        "train.batch_size": batch_size,
        "train.max_steps": max_steps,
        "train.seed": 3,
        # SGD: the update is linear in the gradient, so a gradient error shows (Adam's first steps
        # are close to sign(gradient) and would hide it).
        "optim.name": "sgd",
        "optim.lr": 0.5,
        "optim.weight_decay": 0,
    }


def _as_flags(settings: dict[str, object]) -> list[str]:
    return [argument for key, value in settings.items() for argument in ("--set", f"{key}={value}")]


def _as_config(settings: dict[str, object]) -> RunConfig:
    return build_config(flags=settings, task="sdxl-lora")


@pytest.mark.slow
def test_two_processes_train_the_adapter_of_one_process_with_twice_the_batch(tmp_path: Path):
    data, class_images = _instance_and_class_images(tmp_path)
    two = tmp_path / "two-processes"
    launched = subprocess.run(
        [sys.executable, "-m", "tuner", "train", "sdxl-lora", *_as_flags(_settings(data, two, batch_size=2)),
         "--reg-data", str(class_images), "--checkpoint-every", "2", "--num-processes", "2"],
        cwd=REPO_ROOT, env=process_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "accelerate.commands.launch --num_processes 2" in launched.stdout
    assert "global batch 4 = 2 per device x 2 process(es) x 1 grad-accum" in launched.stdout
    assert launched.stdout.count("Done.") == 1
    assert "masks: 1 from mask files" in launched.stdout
    assert "samples per epoch: 2 instance + 2 class = 4" in launched.stdout

    one = tmp_path / "one-process"
    class_source = {"data.sources": [{"path": str(class_images), "reg": True}]}
    train_sdxl_lora(_as_config(_settings(data, one, batch_size=4) | class_source))

    adapter_two = load_file(two / "pytorch_lora_weights.safetensors")
    adapter_one = load_file(one / "pytorch_lora_weights.safetensors")
    assert adapter_two.keys() == adapter_one.keys()
    trained = max(tensor.abs().max().item() for name, tensor in adapter_one.items() if "lora_B" in name)
    assert trained > 1e-3  # LoRA B starts at zero: the comparison below is not between two inits
    for name, tensor in adapter_one.items():
        torch.testing.assert_close(adapter_two[name], tensor, atol=TOLERANCE, rtol=TOLERANCE, msg=name)

    # The main process alone wrote the run's files: one metrics record per step, one sample grid.
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == [1, 2, 3]
    # Each process saw one part of the batch; the logged parts are over both, as on one process.
    records_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "loss/instance", "loss/prior"):
        logged = [record[key] for record in records if "loss" in record]
        expected = [record[key] for record in records_one if "loss" in record]
        assert logged == pytest.approx(expected, rel=1e-4), key
    assert [path.name for path in (two / "samples").iterdir()] == [f"step-{STEPS:06d}.png"]
    assert (two / "tuner_config.yaml").is_file()

    # Resuming the 2-process checkpoint on 1 process is refused, naming both counts.
    resumed = _as_config(_settings(data, two, batch_size=2, max_steps=STEPS + 2) | class_source)
    with pytest.raises(CheckpointError, match=r"saved by a run on 2 process\(es\); this run has 1"):
        train_sdxl_lora(resumed, resume="latest")
