"""`tuner eval sdxl`: the prompt x seed comparison grid and CLIP scores, on the tiny SDXL and tiny CLIP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from formats.sdxl_lora_files import write_adapter
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from tuner.errors import DataError
from tuner.eval.sdxl import LABEL_HEIGHT, clip_scorer, read_prompts


def test_clip_score_is_hundred_times_the_clamped_cosine(tiny_model):
    folder = tiny_model("clip")
    images = [Image.new("RGB", (40, 40), colour) for colour in ("red", "blue", "green")]
    scores = clip_scorer(str(folder), torch.device("cpu"))(images, "green")
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=["green"], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model(**inputs)
    image = torch.nn.functional.normalize(output.image_embeds, dim=-1)
    text = torch.nn.functional.normalize(output.text_embeds, dim=-1)
    expected = [100 * max(float(value), 0.0) for value in (image @ text.T)[:, 0]]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert any(score > 0 for score in scores) and any(score == 0 for score in scores)


def test_prompts_file_skips_comments_and_refuses_an_empty_one(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red square\n\n# not a prompt\n  a blue circle  \n")
    assert read_prompts(path) == ["a red square", "a blue circle"]
    path.write_text("# nothing\n")
    with pytest.raises(DataError, match="holds no prompt"):
        read_prompts(path)


@pytest.mark.slow
def test_cli_draws_one_comparison_per_prompt_with_adapters_in_columns(tiny_model, tmp_path, capsys):
    adapter = write_adapter(tiny_model("sdxl"), tmp_path / "style", seed=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    out = tmp_path / "eval"
    code, stdout, stderr = run_cli(
        capsys,
        *("eval", "sdxl", "--prompts", str(prompts), "--adapter", str(adapter), "--model", "tiny"),
        *("--seeds", "2", "--steps", "2", "--size", "64x64", "--clip-model", "tiny-clip"),
        *("--out", str(out), "--device", "cpu"),
    )
    assert code == 0, stderr
    report = json.loads((out / "eval.json").read_text())
    assert [model["name"] for model in report["models"]] == ["base", "style"]
    for model in report["models"]:
        assert [(image["prompt"], image["seed"]) for image in model["images"]] == [
            (0, 0),
            (0, 1),
            (1, 0),
            (1, 1),
        ]
        assert all(image["clip_score"] >= 0 for image in model["images"])
        assert model["clip_score"] == pytest.approx(sum(i["clip_score"] for i in model["images"]) / 4)
    assert "CLIP score" in stdout
    for index in range(2):
        grid = Image.open(out / f"prompt-{index:02d}.png")
        assert grid.size == (2 * 64, LABEL_HEIGHT + 2 * 64)  # base | adapter, two seeds in rows
        base = grid.crop((0, LABEL_HEIGHT, 64, LABEL_HEIGHT + 64)).tobytes()
        adapted = grid.crop((64, LABEL_HEIGHT, 128, LABEL_HEIGHT + 64)).tobytes()
        assert base != adapted  # the adapter is on in its column and off in the base column


@pytest.mark.slow
def test_the_base_column_samples_with_the_base_models_own_prediction_type(tiny_model, tmp_path, capsys):
    """A v-prediction adapter on the epsilon tiny model: its column is sampled as v-prediction, the base
    column and `infer --compare`'s base row as the base model samples alone (`tuner infer` without it)."""
    adapter = write_adapter(tiny_model("sdxl"), tmp_path / "vpred", seed=1, prediction_type="v_prediction")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    drawing = ("--steps", "2", "--size", "64x64", "--device", "cpu")

    def infer(out, *extra):
        command = ("infer", "sdxl", "--model", "tiny", "--prompt", "a red square", "--seed", "0", *extra)
        code, _, stderr = run_cli(capsys, *command, *drawing, "--out", str(out))
        assert code == 0, stderr
        return np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)

    base = infer(tmp_path / "base.png")
    adapted = infer(tmp_path / "adapted.png", "--adapter", str(adapter), "--compare")
    code, _, stderr = run_cli(
        capsys,
        *("eval", "sdxl", "--prompts", str(prompts), "--adapter", str(adapter), "--model", "tiny"),
        *("--seeds", "1", *drawing, "--out", str(tmp_path / "eval")),
    )
    assert code == 0, stderr
    grid = Image.open(tmp_path / "eval" / "prompt-00.png").convert("RGB")
    column = [
        np.asarray(grid.crop((left, LABEL_HEIGHT, left + 64, LABEL_HEIGHT + 64)), dtype=np.int16)
        for left in (0, 64)
    ]
    compare = Image.open(tmp_path / "compare.png").convert("RGB")
    compare_base = np.asarray(compare.crop((0, LABEL_HEIGHT, 64, LABEL_HEIGHT + 64)), dtype=np.int16)
    assert np.abs(base - adapted).max() > 20  # v-prediction sampling draws something else
    for image in (column[0], compare_base):
        assert np.abs(image - base).max() <= 1
    assert np.abs(column[1] - adapted).max() <= 1
