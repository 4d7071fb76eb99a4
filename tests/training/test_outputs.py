"""The output folder's one list of what a run writes (RUN_OUTPUTS): finished-run detection and
`--overwrite` both use it, so nothing of a replaced run survives and no finished run goes unnoticed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.cli_runner import run_cli
from tuner.config.schema import RunConfig
from tuner.errors import ConfigError
from tuner.training.outputs import RUN_OUTPUTS, prepare_output_folder


def _config(output_dir: Path) -> dict:
    return RunConfig.model_validate({"task": "sdxl-lora", "output": {"dir": str(output_dir)}}).model_dump(
        mode="json"
    )


def _write(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


@pytest.mark.parametrize("name", [output.name for output in RUN_OUTPUTS if output.result])
def test_any_result_of_a_run_marks_the_folder_finished(tmp_path: Path, name: str) -> None:
    # e.g. a save_format=kohya run leaves only the kohya file, a Qwen-VL EMA run an `ema/` folder.
    _write(tmp_path / name / "adapter_model.safetensors" if name == "ema" else tmp_path / name)
    with pytest.raises(ConfigError, match=f"finished run \\({name}\\)"):
        prepare_output_folder(tmp_path, _config(tmp_path), None, overwrite=False)


def test_overwrite_deletes_every_output_and_keeps_the_cache_and_other_files(tmp_path: Path) -> None:
    folders = {"samples": "answers.jsonl", "ema": "adapter_model.safetensors", "checkpoints": "step-000002/x"}
    for output in RUN_OUTPUTS:
        inside = folders.get(output.name)
        _write(tmp_path / output.name / inside if inside else tmp_path / output.name)
    _write(tmp_path / "samples" / "step-000002.png")
    _write(tmp_path / "cache" / "latents.safetensors")
    _write(tmp_path / "notes.txt")  # the user's own file
    prepare_output_folder(tmp_path, _config(tmp_path), None, overwrite=True)
    left = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    assert left == ["cache", "cache/latents.safetensors", "notes.txt"]


@pytest.mark.slow
def test_overwrite_through_the_cli_leaves_nothing_of_the_replaced_run(capsys, tmp_path: Path) -> None:
    output = tmp_path / "run"
    common = ["train", "sdxl-lora", "--preset", "tiny-cpu", "--output", str(output)]
    first = [
        "--set", "train.max_steps=2",
        "--set", "train.ema_decay=0.9",
        "--set", "output.save_format=both",
        "--set", "output.sample_every=1",
        "--set", "output.sample_steps=1",
        "--set", "output.checkpoint_every=1",
    ]  # fmt: skip
    code, _, err = run_cli(capsys, *common, *first)
    assert code == 0, err
    for name in ("pytorch_lora_weights_ema.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        assert (output / name).is_file(), name
    assert (output / "samples" / "step-000002.png").is_file() and (output / "checkpoints").is_dir()

    code, _, err = run_cli(capsys, *common, "--set", "train.max_steps=1")
    assert code == 2 and "finished run" in err
    # What `tuner eval sdxl --out RUN/eval` leaves beside the run (docs/report.md), which its report shows.
    _write(output / "eval" / "eval.json")

    started = time.time()
    fewer = [
        "--overwrite",
        "--set", "train.max_steps=1",
        "--set", "output.save_format=diffusers",
        "--set", "output.sample_steps=1",
        "--set", "output.checkpoint_every=0",
    ]  # fmt: skip
    code, _, err = run_cli(capsys, *common, *fewer)
    assert code == 0, err
    # Everything in the folder but the content-keyed cache was written by the second run.
    stale = [
        str(path.relative_to(output))
        for path in output.rglob("*")
        if path.is_file() and path.relative_to(output).parts[0] != "cache" and path.stat().st_mtime < started
    ]
    assert stale == []
    assert sorted(path.name for path in (output / "samples").iterdir()) == ["step-000001.png"]
    assert not (output / "pytorch_lora_weights_ema.safetensors").exists()
    assert not (output / "pytorch_lora_weights_kohya.safetensors").exists()
    # Only the replacing run's final checkpoint (every run ends with one, see the training loop).
    assert [path.name for path in (output / "checkpoints").iterdir()] == ["step-000001"]
