"""`tuner generate-class-images`: class images rendered by the base model, resumable and idempotent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli
from PIL import Image

from tuner.errors import ConfigError
from tuner.models import sdxl_class_images
from tuner.models.sdxl_class_images import ClassImageSettings, generate_class_images, numbers_to_render

PROMPT = "a photo of a dog"


def _settings(count: int, **changes) -> ClassImageSettings:
    return ClassImageSettings(prompt=PROMPT, count=count, resolution=32, steps=1, seed=7, **changes)


def _generate(out: Path, count: int, **changes) -> sdxl_class_images.ClassImagesResult:
    return generate_class_images("tiny", _settings(count, **changes), out, device="cpu", show_progress=False)


def test_renders_resumes_identically_and_skips_a_full_folder(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "class"
    first = _generate(out, 3, batch_size=2)
    names = sorted(path.name for path in out.iterdir())
    assert names == [f"class-0000{n}.{ext}" for n in range(3) for ext in ("png", "txt")]
    assert first.written == [out / f"class-0000{n}.png" for n in range(3)]
    assert all((out / f"class-0000{n}.txt").read_text() == PROMPT + "\n" for n in range(3))
    original = np.asarray(Image.open(out / "class-00001.png"))
    assert Image.open(out / "class-00001.png").size == (32, 32)
    assert not np.array_equal(original, np.asarray(Image.open(out / "class-00000.png")))  # seeds differ

    # Image 1 lost, and an interrupted write of it left behind: rendered again from its own seed, the
    # same image (it was rendered in a batch of 2 before, alone now); the temporary file is ignored.
    (out / "class-00001.png").unlink()
    (out / ".class-00001.png.999.tmp").write_bytes(b"\x89PNG half")
    again = _generate(out, 3)
    assert again.held_before == 2 and again.written == [out / "class-00001.png"]
    assert np.array_equal(np.asarray(Image.open(out / "class-00001.png")), original)
    assert not list(out.glob(".*"))

    # A folder that holds enough: nothing to do, and the model is not even loaded.
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sdxl_class_images, "load_sdxl", no_model)
    assert _generate(out, 3).written == [] and _generate(out, 2).written == []


def test_images_already_in_the_folder_count_towards_the_total(tmp_path: Path) -> None:
    for name in ("mine-a.jpg", "mine-b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / ".hidden.png").write_bytes(b"")  # not an image a training run reads
    (tmp_path / "class-00000.png").write_bytes(b"")
    assert numbers_to_render(tmp_path, 5) == (3, [1, 2])
    assert numbers_to_render(tmp_path, 3) == (3, [])


@pytest.mark.parametrize(
    ("changes", "flag"),
    [({"count": 0}, "--count"), ({"resolution": 100}, "--resolution"), ({"prompt": " "}, "--class-prompt")],
)
def test_bad_settings_are_refused_naming_the_flag(tmp_path: Path, changes: dict, flag: str) -> None:
    settings = ClassImageSettings(**{"prompt": PROMPT, "count": 2, **changes})
    with pytest.raises(ConfigError, match=flag):
        generate_class_images("tiny", settings, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_command_renders_then_says_there_is_nothing_to_do(tmp_path: Path, capsys) -> None:
    out = tmp_path / "class"
    argv = [
        "generate-class-images",
        "--model",
        "tiny",
        "--class-prompt",
        PROMPT,
        "--count",
        "1",
        "--out",
        str(out),
        "--resolution",
        "32",
        "--steps",
        "1",
        "--device",
        "cpu",
    ]
    code, printed, _ = run_cli(capsys, *argv)
    assert code == 0 and f"wrote 1 class images to {out}" in printed
    assert (out / "class-00000.png").is_file() and (out / "class-00000.txt").is_file()
    code, printed, _ = run_cli(capsys, *argv)
    assert code == 0 and "nothing to generate" in printed
