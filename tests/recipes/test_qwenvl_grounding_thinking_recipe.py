"""Grounding and reasoning records train through `tuner train qwenvl-lora` on every tiny family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_runner import run_cli
from PIL import Image


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
