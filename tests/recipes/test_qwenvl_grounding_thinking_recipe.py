"""Grounding and reasoning records train through `tuner train qwenvl-lora` on every tiny family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_runner import run_cli
from PIL import Image

from tuner.eval.metrics import score_answer


def _dataset(folder: Path) -> Path:
    """Boxes in user and assistant turns, reasoning inline and as a field, a multi-turn conversation."""
    Image.new("RGB", (120, 90), (240, 240, 240)).save(folder / "scene.png")
    records = [
        {
            "messages": [
                {"role": "user", "content": "<image>Where is the cat?"},
                {"role": "assistant", "content": "<think>It sits left.</think>The cat: <box>"},
            ],
            "images": ["scene.png"],
            "boxes": [{"bbox": [10, 20, 60, 80], "label": "cat"}],
        },
        {
            "conversations": [
                {"from": "human", "value": "<image>What is at <box>?"},
                {"from": "gpt", "value": "A dog.", "reasoning": "Brown fur."},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "Yes.", "reasoning": "Looked again."},
            ],
            "image": "scene.png",
            "boxes": [{"bbox": [70, 10, 110, 50], "label": "dog"}],
        },
    ]
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "policy", "targets"),
    [
        ("tiny-qwen2-vl", "keep", "llm,vision,merger"),
        ("tiny-qwen2.5-vl", "strip", "llm,vision,merger"),
        ("tiny-qwen3-vl", "empty", "llm,vision,merger"),
        # The Thinking template rewrites past replies: the two-reply conversation trains as two samples.
        ("tiny-qwen3-vl-thinking", "keep", "llm"),
    ],
)
def test_boxes_and_reasoning_train_through_the_cli(capsys, tmp_path, model, policy, targets) -> None:
    output = tmp_path / "run"
    vision = (
        ("--set", "lora.lr_vision=0.0005", "--set", "lora.lr_merger=0.002") if "vision" in targets else ()
    )
    code, out, err = run_cli(
        capsys,
        *(
            "train",
            "qwenvl-lora",
            "--preset",
            "tiny-cpu",
            "--model",
            model,
            "--data",
            str(_dataset(tmp_path)),
        ),
        *("--output", str(output), "--max-steps", "2", "--set", f"data.thinking={policy}"),
        *("--set", f"lora.targets=[{targets}]", *vision),
    )
    assert code == 0, err
    assert f"data.thinking={policy}: " in out
    groups = next(line for line in out.splitlines() if line.startswith("trainable parameters: "))
    if "vision" in targets:
        assert "vision " in groups and "(lr 0.0005)" in groups and "(lr 0.002)" in groups
    resolved = yaml.safe_load((output / "tuner_config.yaml").read_text())
    assert resolved["data"]["thinking"] == policy
    assert (output / "adapter_model.safetensors").is_file()
    assert (output / "metrics.jsonl").read_text().strip()  # it trained


def test_sdxl_refuses_the_qwenvl_keys(capsys, tmp_path) -> None:
    for key, value in (("data.thinking", "strip"), ("lora.lr_vision", "0.001"), ("lora.lr_merger", "0.001")):
        code, _, err = run_cli(
            capsys,
            *("train", "sdxl-lora", "--preset", "tiny-cpu", "--output", str(tmp_path / "o")),
            *("--set", f"{key}={value}"),
        )
        assert code == 2 and f"'{key}'" in err and "sdxl-lora does not use it" in err


def _grounding_sets(folder: Path) -> tuple[Path, Path]:
    """Training: a reply that reasons about one box and answers with another. Held out: another
    picture and question, answered with a box."""
    Image.new("RGB", (120, 90), (240, 240, 240)).save(folder / "scene.png")
    Image.new("RGB", (90, 120), (200, 200, 200)).save(folder / "other.png")
    train = {
        "messages": [
            {"role": "user", "content": "<image>Where is the cat?"},
            {"role": "assistant", "content": "<think>Not <box>, a shadow.</think>The cat: <box>"},
        ],
        "images": ["scene.png"],
        "boxes": [{"bbox": [5, 5, 30, 25], "label": "cat"}, {"bbox": [60, 40, 110, 85], "label": "cat"}],
    }
    held_out = {
        "messages": [
            {"role": "user", "content": "<image>Find the dog."},
            {"role": "assistant", "content": "<think>Fur at the top.</think><box>"},
        ],
        "images": ["other.png"],
        "boxes": [{"bbox": [10, 20, 80, 60], "label": "dog"}],
    }
    (folder / "train.jsonl").write_text(json.dumps(train) + "\n", encoding="utf-8")
    (folder / "eval.jsonl").write_text(json.dumps(held_out) + "\n", encoding="utf-8")
    return folder / "train.jsonl", folder / "eval.jsonl"


def _qwen25_box(box: tuple[int, int, int, int], size: tuple[int, int], processor_folder: Path) -> list[int]:
    """The box as Qwen2.5-VL writes it: pixels of the image after the processor's resize."""
    from transformers import AutoProcessor

    from tuner.data.grounding import Box, model_coordinates, resized_size

    processor = AutoProcessor.from_pretrained(str(processor_folder))
    return list(model_coordinates(Box(*box, label=""), "qwen2_5_vl", size, resized_size(processor, *size)))


@pytest.mark.slow
def test_grounding_references_carry_their_own_boxes_and_keep_the_best_box_iou(capsys, tmp_path) -> None:
    train, held_out = _grounding_sets(tmp_path)
    output = tmp_path / "run"
    code, out, err = run_cli(
        capsys,
        *("train", "qwenvl-lora", "--preset", "tiny-cpu", "--model", "tiny-qwen2.5-vl", "--data", str(train)),
        *("--output", str(output), "--max-steps", "2", "--set", "data.thinking=strip"),
        *("--set", f"output.eval_data={held_out}", "--set", "output.keep_best=eval/box_iou"),
        *("--set", "output.checkpoint_every=0"),
    )
    assert code == 0, err
    # The sample answer's reference is what the stripped reply trains on: the answer's box, not the
    # reasoning's, in Qwen2.5-VL's convention.
    sample = json.loads((output / "samples" / "answers.jsonl").read_text().splitlines()[0])
    wanted = _qwen25_box((60, 40, 110, 85), (120, 90), output)
    assert sample["reference"] == "The cat: " + json.dumps({"bbox_2d": wanted, "label": "cat"})
    evaluated = json.loads((output / "samples" / "eval_answers.jsonl").read_text().splitlines()[0])
    assert evaluated["reference"] == json.dumps(
        {"bbox_2d": _qwen25_box((10, 20, 80, 60), (90, 120), output), "label": "dog"}
    )
    assert set(evaluated["scores"]) == {"box_accuracy", "box_iou"}
    assert "best checkpoint (eval/box_iou=" in out
    assert (output / "checkpoints" / "step-000002").is_dir()


def test_a_keep_best_metric_the_eval_set_never_produces_is_refused_at_start(capsys, tmp_path) -> None:
    _, held_out = _grounding_sets(tmp_path)
    output = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        *("train", "qwenvl-lora", "--preset", "tiny-cpu", "--output", str(output), "--max-steps", "2"),
        *("--set", f"output.eval_data={held_out}", "--set", "output.keep_best=eval/anls"),
    )
    assert code == 2
    assert "output.keep_best=eval/anls" in err and "box_iou" in err
    assert not (output / "metrics.jsonl").exists()  # refused before the first step


@pytest.mark.parametrize("model", ["tiny-qwen3-vl", "tiny-qwen3-vl-thinking"])
def test_reasoning_references_are_the_final_answer(capsys, tmp_path, model) -> None:
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "red.png")
    record = {
        "messages": [
            {"role": "user", "content": "<image>Colour?"},
            {"role": "assistant", "content": "Red.", "reasoning_content": "The whole picture is red."},
        ],
        "images": ["red.png"],
    }
    (tmp_path / "eval.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    code, _, err = run_cli(
        capsys,
        *("eval", "qwenvl", "--data", str(tmp_path / "eval.jsonl"), "--model", model),
        *("--out", str(tmp_path / "out"), "--max-new-tokens", "4", "--device", "cpu"),
    )
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    answer = json.loads((tmp_path / "out" / report["models"][0]["answers"]).read_text())
    assert answer["reference"] == "Red."
    scored = answer.get("final_answer", answer["answer"])  # the answer after its reasoning
    assert answer["scores"] == score_answer(scored, ["Red."])
