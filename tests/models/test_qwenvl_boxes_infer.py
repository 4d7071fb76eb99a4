"""`tuner infer qwenvl --draw-boxes`: the boxes of an answer drawn on the input image, per family."""

from __future__ import annotations

import pytest
from cli_runner import run_cli
from PIL import Image

import tuner.models.qwenvl_infer as qwenvl_infer


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "scene.png"
    Image.new("RGB", (100, 90), (255, 255, 255)).save(path)
    return path


def test_draw_boxes_runs_the_model_and_writes_the_image(capsys, image, tmp_path) -> None:
    out = tmp_path / "drawn.png"
    code, stdout, err = run_cli(
        capsys,
        *("infer", "qwenvl", "--model", "tiny-qwen2-vl", "--image", str(image), "--prompt", "Where?"),
        *("--draw-boxes", str(out), "--device", "cpu", "--max-new-tokens", "4"),
    )
    assert code == 0, err
    assert f"wrote {out} (" in stdout  # a random model draws no box, but the image is written
    assert Image.open(out).size == (100, 90)


@pytest.mark.parametrize(
    ("model", "answer"),
    [
        # 0-1000 normalised on the 100x90 image: x 250 -> 25 px, y 500 -> 45 px, x 750 -> 75 px.
        (
            "tiny-qwen2-vl",
            "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(250,500),(750,800)<|box_end|>",
        ),
        ("tiny-qwen3-vl", '```json\n[{"bbox_2d": [250, 500, 750, 800], "label": "cat"}]\n```'),
        # --max-pixels 40000 resizes the 100x90 image to 112x84: x 28 -> 25 px, y 42 -> 45 px, x 84 -> 75 px.
        ("tiny-qwen2.5-vl", '[{"bbox_2d": [28, 42, 84, 70], "label": "cat"}]'),
    ],
)
def test_draw_boxes_maps_each_familys_answer_back_to_pixels(
    capsys, monkeypatch, image, tmp_path, model, answer
) -> None:
    def fixed_answer(answerer, messages, images, max_new_tokens, temperature, skip_special_tokens=True):
        assert not skip_special_tokens  # Qwen2-VL's box markers are special tokens
        return answer

    monkeypatch.setattr(qwenvl_infer, "generate_answer", fixed_answer)
    out = tmp_path / "drawn.png"
    code, stdout, err = run_cli(
        capsys,
        *("infer", "qwenvl", "--model", model, "--image", str(image), "--prompt", "Locate the cat"),
        *("--draw-boxes", str(out), "--device", "cpu", "--max-pixels", str(200 * 200)),
    )
    assert code == 0, err
    assert stdout.endswith(f"wrote {out} (1 box)\n")
    drawn = Image.open(out).convert("RGB")
    red, white = (255, 0, 0), (255, 255, 255)
    assert drawn.getpixel((25, 60)) == red  # left edge
    assert drawn.getpixel((75, 60)) == red  # right edge
    assert drawn.getpixel((60, 45)) == red  # top edge
    assert drawn.getpixel((60, 60)) == white  # inside
    assert drawn.getpixel((20, 60)) == white  # outside


def test_draw_boxes_needs_one_image(capsys, image, tmp_path) -> None:
    code, _, err = run_cli(
        capsys,
        *(
            "infer",
            "qwenvl",
            "--model",
            "tiny",
            "--prompt",
            "Where?",
            "--draw-boxes",
            str(tmp_path / "x.png"),
        ),
    )
    assert code == 2 and "--draw-boxes needs --prompt and exactly one --image" in err
