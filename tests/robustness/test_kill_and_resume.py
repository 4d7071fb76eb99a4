"""A run killed with SIGKILL after a checkpoint and resumed with `--resume latest` ends with the same
adapter, bit for bit, as a run that was never interrupted: for both recipes, mid-epoch, with gradient
accumulation, and (SDXL) with the tiny dataset's three aspect buckets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tuner.training.checkpoints import find_latest_checkpoint

TUNER = [sys.executable, "-m", "tuner"]
# 16 optimizer steps with a checkpoint every 4: the kill lands after step 4, mid-epoch (the tiny datasets
# hold 3-5 accumulation windows per epoch), with 12 steps still to go.
COMMON = [
    "--preset",
    "tiny-cpu",
    "--max-steps",
    "16",
    "--grad-accum",
    "2",
    "--checkpoint-every",
    "4",
    "--keep-checkpoints",
    "3",
    "--set",
    "output.log_every=1",
]
ADAPTER_FILE = {"sdxl-lora": "pytorch_lora_weights.safetensors", "qwenvl-lora": "adapter_model.safetensors"}


def train(task: str, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TUNER, "train", task, *COMMON, "--output", str(output), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ.copy(),
    )


def kill_after_first_checkpoint(task: str, output: Path) -> Path:
    process = subprocess.Popen(
        [*TUNER, "train", task, *COMMON, "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    try:
        deadline = time.monotonic() + 300
        while (checkpoint := find_latest_checkpoint(output)) is None:
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (output / ADAPTER_FILE[task]).exists(), "the kill came too late: the run had finished"
    return checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sdxl-lora", "qwenvl-lora"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path, task: str):
    uninterrupted = train(task, tmp_path / "whole")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

    killed = tmp_path / "killed"
    checkpoint = kill_after_first_checkpoint(task, killed)
    assert checkpoint.name.startswith("step-")
    resumed = train(task, killed, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    expected = load_file(tmp_path / "whole" / ADAPTER_FILE[task])
    actual = load_file(killed / ADAPTER_FILE[task])
    assert expected.keys() == actual.keys() and expected
    different = [name for name in expected if not expected[name].equal(actual[name])]
    assert different == [], f"{len(different)} tensors differ after resume, e.g. {different[:3]}"


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_with_the_preemption_code(tmp_path: Path):
    output = tmp_path / "preempted"
    command = [
        *TUNER,
        "train",
        "qwenvl-lora",
        "--preset",
        "tiny-cpu",
        "--max-steps",
        "400",
        "--checkpoint-every",
        "4",
        "--output",
        str(output),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    deadline = time.monotonic() + 300
    while (first := find_latest_checkpoint(output)) is None:
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the signal"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "--resume latest" in stderr
    latest = find_latest_checkpoint(output)
    # The step under way when the signal came was finished and checkpointed; the run did not finish.
    assert int(latest.name.removeprefix("step-")) >= int(first.name.removeprefix("step-"))
    assert (latest / "manifest.json").is_file()
    assert not (output / ADAPTER_FILE["qwenvl-lora"]).exists()
