"""Qwen-VL LoRA on 2 processes with a mix of text-only and image conversations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.distributed.conftest import REPO_ROOT, RUN_TIMEOUT_S, process_env
from tuner.recipes.qwenvl import SAMPLE_PROMPTS

MIXED_RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "<image>What colour is it?"},
            {"role": "assistant", "content": "Red."},
        ],
        "images": ["red.png"],
    },
    {
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ]
    },
]


@pytest.fixture
def mixed_conversations(tmp_path: Path) -> Path:
    Image.new("RGB", (64, 48), (220, 30, 30)).save(tmp_path / "red.png")
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(record) + "\n" for record in MIXED_RECORDS), encoding="utf-8")
    return data_file


@pytest.mark.slow
def test_text_only_process_still_runs_the_vision_tower(torchrun, tiny_model, mixed_conversations, tmp_path):
    model_dir = tiny_model("qwen2.5-vl")
    done = torchrun(
        ["tests/distributed/vision_grad_worker.py", str(model_dir), str(mixed_conversations), str(tmp_path)]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads((tmp_path / f"grads-{rank}.json").read_text()) for rank in (0, 1)]
    assert [record["has_image"] for record in records] == [True, False]
    for record in records:
        # DDP all-reduced every vision LoRA gradient: both processes ran the vision tower.
        assert record["vision_lora"] > 0
        assert record["vision_lora_with_grad"] == record["vision_lora"]


@pytest.mark.slow
def test_recipe_runs_on_two_processes_and_writes_its_files_once(tmp_path: Path):
    # The tiny dataset has 9 conversations with an image and 1 without; 5 steps of batch 1 on
    # 2 processes go through all 10, so some step pairs the text-only one with an image.
    output = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "tuner", "train", "qwenvl-lora", "--model", "tiny", "--data", "tiny",
         "--output", str(output), "--device", "cpu", "--batch-size", "1", "--max-steps", "5",
         "--targets", "llm,vision", "--set", "data.max_pixels=4096", "--set", "data.min_pixels=3136",
         "--set", "output.log_every=1", "--num-processes", "2"],
        cwd=REPO_ROOT, env=process_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 2 = 1 per device x 2 process(es) x 1 grad-accum" in done.stdout
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == [1, 2, 3, 4, 5]
    answers = (output / "samples" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == SAMPLE_PROMPTS  # sampled once, by the main process
    assert (output / "adapter_model.safetensors").is_file() and (output / "tuner_config.yaml").is_file()
