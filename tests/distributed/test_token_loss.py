"""Qwen-VL's loss weighs every supervised token the same, however the step's samples are split: one
batch of 2, 2 accumulated batches of 1, or 2 processes with a batch of 1 each give the same update."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_runner import run_cli
from tests.distributed.conftest import REPO_ROOT, RUN_TIMEOUT_S, process_env

# A 1-word and a 40-word answer: a per-micro-batch mean would weigh the short answer's token 40x more.
LONG_ANSWER = " ".join(f"word{index % 7}" for index in range(40))
RECORDS = [
    {"messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]},
    {"messages": [{"role": "user", "content": "Say more."}, {"role": "assistant", "content": LONG_ANSWER}]},
]
# One SGD step without clipping: the update is -lr times the gradient, nothing hides a wrong weighting.
SETTINGS = [
    "--model", "tiny", "--device", "cpu", "--max-steps", "1", "--lr", "0.5",
    "--set", "optim.name=sgd", "--set", "optim.max_grad_norm=null", "--set", "optim.scheduler=constant",
    "--set", "output.checkpoint_every=0",
]  # fmt: skip


@pytest.fixture
def two_answers(tmp_path: Path) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS), encoding="utf-8")
    return data


def adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "adapter_model.safetensors")


@pytest.mark.slow
def test_batch_accumulation_and_processes_give_the_same_update(capsys, tmp_path: Path, two_answers: Path):
    runs = {}
    for name, split in {
        "batch 2": ["--batch-size", "2"],
        "accum 2": ["--batch-size", "1", "--grad-accum", "2"],
    }.items():
        output = tmp_path / name.replace(" ", "-")
        code, _, err = run_cli(
            capsys,
            "train",
            "qwenvl-lora",
            "--data",
            str(two_answers),
            "--output",
            str(output),
            *SETTINGS,
            *split,
        )
        assert code == 0, err[-2000:]
        runs[name] = adapter(output)
    output = tmp_path / "processes-2"
    done = subprocess.run(
        [sys.executable, "-m", "tuner", "train", "qwenvl-lora", "--data", str(two_answers),
         "--output", str(output), *SETTINGS, "--batch-size", "1", "--num-processes", "2"],
        cwd=REPO_ROOT, env=process_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs["2 processes"] = adapter(output)

    reference = runs.pop("batch 2")
    assert any(tensor.abs().max() > 0 for name, tensor in reference.items() if "lora_B" in name)
    for name, weights in runs.items():
        for key, tensor in reference.items():
            torch.testing.assert_close(weights[key], tensor, rtol=1e-4, atol=1e-7, msg=f"{name}: {key}")
