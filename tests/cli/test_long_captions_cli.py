"""Captions longer than 75 tokens from the command line (issue #27): `tuner data check sdxl` counts the
captions training would cut, a run says it at start, and `data.max_caption_tokens` reaches the adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_runner import run_cli

from tuner.models.sdxl_lora import read_adapter_metadata
from tuner.tiny.datasets import build_tiny_dataset

LONG = ", ".join(f"tag{index} blue circle on grass" for index in range(7))


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    """The tiny SDXL dataset (8 images) with two captions of about 140 tokens."""
    folder = Path(shutil.copytree(build_tiny_dataset("sdxl"), tmp_path / "shapes"))
    for caption in sorted(folder.glob("*.txt"))[:2]:
        caption.write_text(LONG, encoding="utf-8")
    return folder


def test_data_check_counts_the_captions_each_setting_cuts(capsys, shapes: Path) -> None:
    code, out, err = run_cli(capsys, "data", "check", "sdxl", str(shapes), "--model", "tiny")
    assert code == 0, err
    assert "2 of 8 captions are longer than 75 tokens" in out
    assert "data.max_caption_tokens=225 trains up to 225" in out
    code, out, _ = run_cli(
        capsys, "data", "check", "sdxl", str(shapes), "--model", "tiny", "--max-caption-tokens", "150"
    )
    assert "0 of 8 captions are longer than 150 tokens" in out
    code, _, err = run_cli(
        capsys, "data", "check", "sdxl", str(shapes), "--model", "tiny", "--max-caption-tokens", "100"
    )
    assert code == 2 and "75, 150 or 225" in err


@pytest.mark.slow
def test_a_run_says_what_it_cuts_and_records_the_setting(capsys, shapes: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(
        capsys,
        *(
            "train",
            "sdxl-lora",
            "--preset",
            "tiny-cpu",
            "--data",
            str(shapes),
            "--output",
            str(tmp_path / "run"),
        ),
        *("--max-steps", "2", "--set", "output.sample_steps=1", "--set", "data.max_caption_tokens=150"),
    )
    assert code == 0, err
    assert "caption tokens: 0 of 8 captions are longer than 150 tokens" in out
    header = read_adapter_metadata(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert header["tuner.max_caption_tokens"] == "150"
    kohya = read_adapter_metadata(tmp_path / "run" / "pytorch_lora_weights_kohya.safetensors")
    assert kohya["ss_max_token_length"] == "150"
