"""Invariants a run must keep under the settings real runs use, checked through the CLI on tiny models:
the adapter does not depend on the number of data-loader workers, gradient checkpointing recomputes,
and LoRA dropout acts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tuner.recipes.qwenvl
import tuner.recipes.sdxl
from tests.cli_runner import run_cli

ADAPTER_FILE = {"sdxl-lora": "pytorch_lora_weights.safetensors", "qwenvl-lora": "adapter_model.safetensors"}
# Every per-sample random draw the family has: flips, caption dropout and tag shuffles (SDXL), noise and
# timesteps (SDXL), LoRA dropout (both); 3 epochs so that a worker stuck at epoch 0 shows.
RANDOM_DRAWS = {
    "sdxl-lora": [
        "data.random_flip=true",
        "data.caption_dropout=0.3",
        "data.shuffle_tags=true",
        "lora.dropout=0.1",
    ],
    "qwenvl-lora": ["lora.dropout=0.1"],
}


def train(capsys, task: str, output: Path, *settings: str, epochs: int = 3) -> dict[str, torch.Tensor]:
    """`tuner train TASK --preset tiny-cpu` for `epochs` epochs with `--set` `settings`; the adapter."""
    if task == "sdxl-lora":
        settings = ("output.sample_steps=1", *settings)  # the final sample grid, quickly
    overrides = [part for setting in settings for part in ("--set", setting)]
    code, _, err = run_cli(
        capsys,
        "train",
        task,
        "--preset",
        "tiny-cpu",
        "--output",
        str(output),
        "--epochs",
        str(epochs),
        "--set",
        "train.max_steps=null",
        "--set",
        "output.checkpoint_every=0",
        *overrides,
    )
    assert code == 0, err[-2000:]
    return load_file(output / ADAPTER_FILE[task])


def assert_same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"{len(different)} of {len(first)} tensors differ, e.g. {different[:2]}"


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sdxl-lora", "qwenvl-lora"])
def test_the_adapter_does_not_depend_on_the_number_of_workers(capsys, tmp_path: Path, task: str):
    draws = RANDOM_DRAWS[task]
    in_process = train(capsys, task, tmp_path / "workers-0", *draws, "data.num_workers=0")
    in_workers = train(capsys, task, tmp_path / "workers-2", *draws, "data.num_workers=2")
    assert_same(in_process, in_workers)


class ForwardCounter:
    """Counts the forward calls of one module inside a checkpointed layer; transformers 5.23 wraps the
    layer's `forward` (not `__call__`) in the checkpoint, so hooks on the layer itself miss recomputes."""

    def __init__(self) -> None:
        self.calls = 0

    def attach(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


@pytest.fixture
def mlp_calls(monkeypatch) -> ForwardCounter:
    """Counts the calls of the first decoder layer's MLP (Qwen-VL) or of the second text encoder's first
    MLP (SDXL)."""
    counter = ForwardCounter()
    add_lora, setup_lora = tuner.recipes.qwenvl.add_lora, tuner.recipes.sdxl.setup_lora

    def add_lora_counted(model, *args, **kwargs):
        peft_model = add_lora(model, *args, **kwargs)
        counter.attach(model.model.language_model.layers[0].mlp)
        return peft_model

    def setup_lora_counted(components, *args, **kwargs):
        groups = setup_lora(components, *args, **kwargs)
        counter.attach(components.text_encoder_2.text_model.encoder.layers[0].mlp)
        return groups

    monkeypatch.setattr(tuner.recipes.qwenvl, "add_lora", add_lora_counted)
    monkeypatch.setattr(tuner.recipes.sdxl, "setup_lora", setup_lora_counted)
    return counter


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sdxl-lora", "qwenvl-lora"])
def test_gradient_checkpointing_recomputes_in_a_real_run(capsys, tmp_path: Path, task: str, mlp_calls):
    # 2 optimizer steps x 2 micro-batches; SDXL trains its text encoders so that they are checkpointed.
    settings = ["train.max_steps=2", "train.grad_accum=2"]
    if task == "sdxl-lora":
        settings.append("lora.text_encoder=true")
    train(capsys, task, tmp_path / "plain", *settings, "train.gradient_checkpointing=false")
    without = mlp_calls.calls
    mlp_calls.calls = 0
    train(capsys, task, tmp_path / "checkpointed", *settings, "train.gradient_checkpointing=true")
    # Sampling at the end runs the same forwards in both; each training micro-batch is recomputed once.
    assert mlp_calls.calls - without == 4, (without, mlp_calls.calls)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sdxl-lora", "qwenvl-lora"])
def test_lora_dropout_changes_what_trains(capsys, tmp_path: Path, task: str):
    settings = ["train.max_steps=3"]
    without = train(capsys, task, tmp_path / "dropout-0", *settings, "lora.dropout=0.0")
    with_dropout = train(capsys, task, tmp_path / "dropout-05", *settings, "lora.dropout=0.5")
    assert any(not torch.equal(without[name], with_dropout[name]) for name in without)
