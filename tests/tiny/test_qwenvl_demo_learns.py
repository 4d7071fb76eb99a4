"""The demo's Qwen-VL part, scaled down: a LoRA on the tiny random Qwen2.5-VL learns to answer held-out
pictures of the generated dataset that the base model cannot answer (scripts/demo.sh, README "The demo")."""

from __future__ import annotations

import json

import pytest

from tests.cli_runner import run_cli

# The demo's settings (scripts/demo.sh) at fewer steps.
STEPS = 100


@pytest.mark.slow
def test_a_short_demo_run_answers_held_out_pictures_the_base_cannot(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, stderr = run_cli(
        capsys,
        *("train", "qwenvl-lora", "--preset", "tiny-cpu", "--output", str(run), "--max-steps", str(STEPS)),
        *("--batch-size", "8", "--targets", "llm,vision,merger", "--rank", "8", "--alpha", "16"),
        *("--lr", "5e-3", "--set", "lora.lr_vision=2e-3", "--set", "lora.lr_merger=2e-3"),
        *("--set", "optim.scheduler=cosine", "--set", "runtime.num_threads=1"),
    )
    assert code == 0, stderr
    code, _, stderr = run_cli(
        capsys,
        *("eval", "qwenvl", "--data", "tiny", "--adapter", str(run), "--out", str(tmp_path / "eval")),
        *("--max-new-tokens", "20", "--device", "cpu"),
    )
    assert code == 0, stderr
    base, adapter = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]
    assert base["metrics"]["exact_match"] == 0.0
    assert adapter["metrics"]["exact_match"] >= 0.5
