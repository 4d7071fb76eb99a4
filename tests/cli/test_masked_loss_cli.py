"""`tuner train sdxl-lora --masked-loss` and `tuner data check sdxl --masked-loss` from the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from PIL import Image
from safetensors.torch import load_file

from tuner.models.sdxl_lora import read_adapter_metadata
from tuner.tiny.datasets import build_tiny_dataset


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    """A copy of the tiny SDXL dataset (8 images with captions)."""
    return Path(shutil.copytree(build_tiny_dataset("sdxl"), tmp_path / "shapes"))


def write_masks(folder: Path, value: int) -> None:
    (folder / "masks").mkdir()
    for image in folder.glob("*.png"):
        Image.new("L", Image.open(image).size, value).save(folder / "masks" / image.name)


def train(capsys, output: Path, data: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(
        capsys,
        *("train", "sdxl-lora", "--preset", "tiny-cpu", "--data", str(data), "--output", str(output)),
        *("--max-steps", "3", "--set", "output.sample_steps=1", "--set", "data.random_flip=true"),
        *extra,
    )


@pytest.mark.slow
def test_a_white_mask_trains_exactly_like_no_mask(capsys, shapes: Path, tmp_path: Path) -> None:
    code, _, err = train(capsys, tmp_path / "plain", shapes)
    assert code == 0, err
    write_masks(shapes, 255)
    code, out, err = train(capsys, tmp_path / "masked", shapes, "--masked-loss")
    assert code == 0, err
    # kohya_ss #2884: the run says how many masks it found.
    assert "masks: 8 from mask files, 0 from alpha channels, 0 without a mask" in out

    plain = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    masked = load_file(tmp_path / "masked" / "pytorch_lora_weights.safetensors")
    assert plain.keys() == masked.keys()
    for key in plain:
        assert torch.equal(plain[key], masked[key]), key
    assert any(
        not torch.equal(value, torch.zeros_like(value)) for key, value in masked.items() if "lora_B" in key
    )

    header = read_adapter_metadata(tmp_path / "masked" / "pytorch_lora_weights.safetensors")
    assert header["tuner.masked_loss"] == "True"
    assert json.loads(header["tuner.masks"]) == {"files": 8, "alpha": 0, "none": 0}
    kohya = read_adapter_metadata(tmp_path / "masked" / "pytorch_lora_weights_kohya.safetensors")
    assert kohya["ss_masked_loss"] == "True"


def test_a_mask_problem_stops_the_run_before_any_model_loads(capsys, shapes: Path, tmp_path: Path) -> None:
    write_masks(shapes, 255)
    mask = shapes / "masks" / "00-red-square.png"
    Image.new("L", (10, 10), 255).save(mask)
    code, _, err = train(capsys, tmp_path / "out", shapes, "--masked-loss")
    assert code == 2
    assert f"{mask}: mask is 10x10, but its image" in err


def test_a_mask_dir_without_masked_loss_is_refused(capsys, shapes: Path, tmp_path: Path) -> None:
    code, _, err = train(capsys, tmp_path / "out", shapes, "--mask-dir", str(tmp_path))
    assert code == 2 and "data.masked_loss is off" in err


def test_data_check_names_a_mask_whose_size_differs(capsys, shapes: Path, tmp_path: Path) -> None:
    mask_dir = tmp_path / "my-masks"
    mask_dir.mkdir()
    Image.new("L", (32, 32), 255).save(mask_dir / "00-red-square.png")  # the image is 96x96
    Image.new("L", (128, 96), 255).save(mask_dir / "01-blue-circle.webp")
    code, out, _ = run_cli(capsys, "data", "check", "sdxl", str(shapes), "--mask-dir", str(mask_dir))
    assert code == 1
    mismatched = mask_dir / "00-red-square.png"
    assert f"{mismatched}: mask is 32x32, but its image {shapes / '00-red-square.png'} is 96x96" in out
    assert "7 samples ok, 1 problem (mask-size 1)" in out
    assert "masks from files:" in out and "images without mask:" in out

    code, _, err = run_cli(capsys, "data", "check", "qwenvl", str(shapes), "--masked-loss")
    assert code == 2 and "--masked-loss only apply to sdxl datasets" in err
