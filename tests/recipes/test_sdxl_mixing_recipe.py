"""Repeats, mixed sources and regularisation images through `tuner train sdxl-lora` on the tiny SDXL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from tests.cli_runner import run_cli
from tuner.models.sdxl_lora import read_adapter_metadata


def _images(folder: Path, count: int, caption: str | None, size: tuple[int, int] = (64, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", size, (60 * index % 255, 40 + 30 * index, 200)).save(folder / f"{index}.png")
        if caption is not None:
            (folder / f"{index}.txt").write_text(f"{caption} {index}", encoding="utf-8")
    return folder


def _train(capsys, output: Path, *arguments: str) -> str:
    code, out, err = run_cli(
        capsys,
        "train",
        "sdxl-lora",
        "--preset",
        "tiny-cpu",
        "--output",
        str(output),
        "--set",
        "output.sample_steps=1",
        "--set",
        "output.log_every=1",
        *arguments,
    )
    assert code == 0, err
    return out


@pytest.mark.slow
def test_two_sources_with_repeats_count_in_the_epoch_and_resume_exactly(tmp_path: Path, capsys) -> None:
    # 3 images x 2 (kohya folder) + half of 4 each epoch = 8 samples = 4 batches of 2 per epoch.
    style = _images(tmp_path / "style" / "2_sks", 3, "sks style")
    variety = _images(tmp_path / "variety", 4, "a plain colour")
    data = ["--data", str(style.parent), "--data", f"{variety}@0.5"]
    out = _train(capsys, tmp_path / "straight", *data, "--epochs", "2", "--max-steps", "8")
    assert "samples per epoch: 8 instance + 0 class = 8" in out
    assert any(
        line.split()[:2] == ["64x64", "8"] for line in out.splitlines()
    )  # the histogram counts samples
    split = tmp_path / "split"
    # Stopped in the second epoch (the half share has moved on to the other variety images), then resumed.
    _train(capsys, split, *data, "--max-steps", "5", "--checkpoint-every", "1")
    _train(capsys, split, *data, "--max-steps", "8", "--resume", "latest")

    expected = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    resumed = load_file(split / "pytorch_lora_weights.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)
    header = read_adapter_metadata(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    assert (header["tuner.epochs"], header["tuner.images"], header["tuner.train_samples"]) == ("2", "7", "8")
    assert json.loads(header["tuner.dataset_dirs"]) == {
        "2_sks": {"n_repeats": 2, "img_count": 3},
        "variety": {"n_repeats": 0.5, "img_count": 4},
    }


@pytest.mark.slow
def test_class_images_are_balanced_marked_prior_and_recorded_for_kohya(tmp_path: Path, capsys) -> None:
    instance = _images(tmp_path / "dog", 4, "sks dog")
    reg = _images(tmp_path / "reg", 2, caption=None)  # captioned by --class-prompt
    out = _train(
        capsys,
        tmp_path / "out",
        "--data",
        str(instance),
        "--reg-data",
        str(reg),
        "--class-prompt",
        "a dog",
        "--epochs",
        "1",
        "--max-steps",
        "4",
        "--set",
        "output.save_format=both",
    )
    # Balanced: 2 class images x 2 repeats = the 4 instance samples.
    assert "samples per epoch: 4 instance + 4 class = 8" in out
    assert "note: 2 images of " in out and "captioned with data.class_prompt" in out
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # Class samples are prior=True: their loss is the prior loss, logged apart.
    assert any("loss/prior" in record for record in records)
    header = read_adapter_metadata(tmp_path / "out" / "pytorch_lora_weights_kohya.safetensors")
    assert (header["ss_num_train_images"], header["ss_num_reg_images"]) == ("4", "4")
    assert json.loads(header["ss_dataset_dirs"]) == {"dog": {"n_repeats": 1, "img_count": 4}}
    assert json.loads(header["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 2, "img_count": 2}}
    assert header["ss_num_epochs"] == "1"


def test_a_bad_data_suffix_is_a_one_line_config_error(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(
        capsys, "train", "sdxl-lora", "--preset", "tiny-cpu", "--output", str(tmp_path), "--data", "style@x"
    )
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert error_lines == [
        "error: --data 'style@x': 'x' after the last '@' is not a positive number of repeats"
    ]


def test_data_check_reports_repeats_reg_images_and_folder_captions(tmp_path: Path, capsys) -> None:
    _images(tmp_path / "data" / "3_sks dog", 2, caption=None)
    reg = _images(tmp_path / "reg", 3, "a dog")
    code, out, err = run_cli(
        capsys, "data", "check", "sdxl", str(tmp_path / "data"), "--reg-data", str(reg), "--resolution", "64"
    )
    assert code == 0, err
    assert "  kohya folder captions:  2" in out  # images without a .txt captioned "sks dog"
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines() if line.startswith(str(tmp_path))}
    assert rows["3_sks"][:1] == ["dog"]  # the folder name has a space: "3_sks dog"
    assert "samples per epoch: 6 instance + 6 class = 12" in out
    assert f"{reg}" in out and "class, balanced" in out


def _sources_config(tmp_path: Path, sources: list[dict]) -> Path:
    """A config whose images come from data.sources alone (no data.path)."""
    config = tmp_path / "sources.yaml"
    config.write_text(json.dumps({"data": {"path": None, "sources": sources}}), encoding="utf-8")
    return config


def test_a_run_of_class_images_alone_is_refused(tmp_path: Path, capsys) -> None:
    reg = _images(tmp_path / "reg", 2, "a dog")
    config = _sources_config(tmp_path, [{"path": str(reg), "reg": True}])
    code, _, err = run_cli(
        capsys,
        "train",
        "sdxl-lora",
        "--preset",
        "tiny-cpu",
        "--config",
        str(config),
        "--output",
        str(tmp_path),
    )
    assert code == 2
    assert "error: every data source is a regularisation source" in err


@pytest.mark.slow
def test_data_sources_alone_train_without_data_path(tmp_path: Path, capsys) -> None:
    style = _images(tmp_path / "style", 2, "sks style")
    config = _sources_config(tmp_path, [{"path": str(style), "repeats": 2}])
    out = _train(capsys, tmp_path / "out", "--config", str(config), "--max-steps", "2")
    assert "samples per epoch: 4 instance + 0 class = 4" in out
    header = read_adapter_metadata(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert json.loads(header["tuner.dataset_dirs"]) == {"style": {"n_repeats": 2, "img_count": 2}}


def test_data_check_takes_several_paths_as_training_mixes_them(tmp_path: Path, capsys) -> None:
    style = _images(tmp_path / "style" / "2_sks", 3, "sks style")
    variety = _images(tmp_path / "variety", 4, "a plain colour")
    code, out, err = run_cli(
        capsys, "data", "check", "sdxl", str(style.parent), f"{variety}@0.5", "--resolution", "64"
    )
    assert code == 0, err
    assert "samples per epoch: 8 instance + 0 class = 8" in out  # the training run's mix (see above)

    code, _, err = run_cli(capsys, "data", "check", "qwenvl", "a.jsonl", "b.jsonl")
    assert code == 2 and "qwenvl checks one conversations file at a time" in err


@pytest.mark.slow
def test_a_run_with_class_images_resumes_exactly(tmp_path: Path, capsys) -> None:
    instance = _images(tmp_path / "dog", 3, "sks dog", size=(64, 80))
    reg = _images(tmp_path / "reg", 4, caption=None)
    arguments = ["--data", str(instance), "--reg-data", str(reg), "--class-prompt", "a dog"]
    arguments += ["--prior-loss-weight", "0.5", "--set", "data.validation_fraction=0"]
    _train(capsys, tmp_path / "straight", *arguments, "--max-steps", "5")
    split = tmp_path / "split"
    _train(capsys, split, *arguments, "--max-steps", "3", "--checkpoint-every", "1")
    _train(capsys, split, *arguments, "--max-steps", "5", "--resume", "latest")

    expected = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    resumed = load_file(split / "pytorch_lora_weights.safetensors")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)

    def logged(folder: Path) -> list[dict]:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith("loss")} for r in records if "loss" in r]

    assert logged(split)[-2:] == logged(tmp_path / "straight")[-2:]  # the steps after the resume


@pytest.mark.slow
def test_the_trigger_word_goes_on_instance_captions_and_on_class_sources_that_ask(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    from tuner.models import sdxl_cache

    trained: list[str] = []  # every caption the run encodes (all are cached before the first step)

    def recording(components, captions, device, *window):
        trained.extend(captions)
        return encode_prompt(components, captions, device, *window)

    encode_prompt = sdxl_cache.encode_prompt
    monkeypatch.setattr(sdxl_cache, "encode_prompt", recording)
    instance = _images(tmp_path / "dog", 2, "a photo")
    plain = _images(tmp_path / "class", 2, "a dog", size=(64, 80))
    kohya_style = _images(tmp_path / "class-prefixed", 2, "another dog", size=(80, 64))
    config = tmp_path / "run.yaml"
    sources = [
        {"path": str(plain), "reg": True},
        {"path": str(kohya_style), "reg": True, "caption_prefix": "sks"},  # kohya's behaviour, asked for
    ]
    config.write_text(json.dumps({"data": {"path": str(instance), "sources": sources}}), encoding="utf-8")
    _train(capsys, tmp_path / "out", "--config", str(config), "--caption-prefix", "sks", "--max-steps", "1")
    assert sorted(trained) == [
        "a dog 0",
        "a dog 1",
        "sks, a photo 0",
        "sks, a photo 1",
        "sks, another dog 0",
        "sks, another dog 1",
    ]


@pytest.mark.slow
def test_data_on_the_command_line_replaces_the_configs_sources_and_repeats(tmp_path: Path, capsys) -> None:
    style = _images(tmp_path / "style", 2, "sks style")
    variety = _images(tmp_path / "variety", 3, "a plain colour")
    chosen = _images(tmp_path / "chosen", 2, "the one", size=(64, 80))
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps({"data": {"path": str(style), "repeats": 3, "sources": [{"path": str(variety)}]}}),
        encoding="utf-8",
    )
    out = _train(capsys, tmp_path / "out", "--config", str(config), "--data", str(chosen), "--max-steps", "1")
    assert "samples per epoch" not in out  # one folder, once per epoch: no mix
    header = read_adapter_metadata(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert json.loads(header["tuner.dataset_dirs"]) == {"chosen": {"n_repeats": 1, "img_count": 2}}
    resolved = yaml.safe_load((tmp_path / "out" / "tuner_config.yaml").read_text(encoding="utf-8"))["data"]
    assert (resolved["path"], resolved["repeats"], resolved["sources"]) == (str(chosen), None, [])


# 400 class images over 15 buckets, as many per bucket as rounding each bucket's share on its own
# over-draws: 11 buckets of 30 (1.5 -> 2 each) and 17, 17, 18, 18 (0.85, 0.9 -> 1 each) made 26.
CLASS_BUCKET_SIZES = [30] * 11 + [17, 17, 18, 18]


def _class_images_over_15_buckets(folder: Path) -> Path:
    from tuner.data.buckets import sdxl_buckets

    folder.mkdir(parents=True)
    number = 0
    for (width, height), count in zip(sdxl_buckets(128, 16)[:15], CLASS_BUCKET_SIZES, strict=True):
        for _ in range(count):
            colour = (number % 256, number // 256, 90)  # each its own: no duplicate warnings
            Image.new("RGB", (width, height), colour).save(folder / f"{number}.png")
            (folder / f"{number}.txt").write_text("a dog", encoding="utf-8")
            number += 1
    return folder


def test_balanced_class_images_draw_as_many_samples_as_the_instance_images(tmp_path: Path, capsys) -> None:
    instance = _images(tmp_path / "dog", 20, "sks dog", size=(128, 128))
    reg = _class_images_over_15_buckets(tmp_path / "class")
    command = ["data", "check", "sdxl", str(instance), "--reg-data", str(reg), "--resolution", "128"]
    code, out, err = run_cli(capsys, *command, "--bucket-step", "16")
    assert code == 0, err
    assert "samples per epoch: 20 instance + 20 class = 40" in out
