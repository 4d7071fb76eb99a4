"""Every shipped preset trains: its settings applied to the tiny model of its family, with sizes, device,
precision and step count scaled down and everything else kept (workers, gradient checkpointing,
dropout, schedule and warmup, EMA, accumulation, batch size up to 2, checkpointing, snr_gamma, targets).
The loop itself asserts train mode at the first step; the test checks the run's outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.cli_runner import run_cli
from tuner.config.presets import load_preset, preset_names

ADAPTER_FILE = {"sdxl-lora": "pytorch_lora_weights.safetensors", "qwenvl-lora": "adapter_model.safetensors"}
# Settings that cannot run on this machine, and why; the rest of the preset still runs.
NOT_ON_CPU = {
    "zero3": "DeepSpeed ZeRO-3 shards across CUDA/NPU devices (and needs the deepspeed extra)",
    "fsdp": "FSDP shards across CUDA/NPU devices; Accelerate 1.15 ignores its plugin with cpu=True",
}


def scaled_down(preset: dict, task: str) -> list[str]:
    """`--set` overrides that fit the preset on the tiny model, on the CPU, in 3 steps."""
    train, data = preset.get("train", {}), preset.get("data", {})
    settings = {
        "model.name_or_path": "tiny",
        "data.path": "tiny",
        "runtime.device": "cpu",
        "runtime.mixed_precision": "no",
        "train.max_steps": 3,
        "train.batch_size": min(train.get("batch_size", 1), 2),
        "train.grad_accum": min(train.get("grad_accum", 1), 2),
        "data.num_workers": min(data.get("num_workers", 0), 2),
        "lora.rank": 4,
        "optim.warmup_steps": min(preset.get("optim", {}).get("warmup_steps", 0), 1),
        "output.checkpoint_every": 2,
        "output.log_every": 1,
    }
    if task == "sdxl-lora":
        settings |= {
            "model.vae": None,
            "model.vae_half_precision_safe": False,
            "data.resolution": 64,
            "data.bucket_step": 16,
            "output.sample_steps": 1,
        }
        if preset.get("output", {}).get("sample_every"):
            settings["output.sample_every"] = 2
    else:
        settings |= {"data.max_pixels": 12544, "data.min_pixels": 3136, "data.max_length": 512}
    distributed = preset.get("runtime", {}).get("distributed")
    if distributed in NOT_ON_CPU:
        settings["runtime.distributed"] = "ddp"
    return [
        part
        for key, value in settings.items()
        for part in ("--set", f"{key}={'null' if value is None else json.dumps(value)}")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", preset_names())
def test_preset_settings_train_on_the_tiny_model(capsys, tmp_path: Path, name: str):
    shared = load_preset(name)
    tasks = [shared["task"]] if "task" in shared else ["sdxl-lora", "qwenvl-lora"]
    distributed = shared.get("runtime", {}).get("distributed")
    if distributed in NOT_ON_CPU:
        print(f"{name}: runs with runtime.distributed=ddp here: {NOT_ON_CPU[distributed]}")
    for task in tasks:
        preset = load_preset(name, task)
        output = tmp_path / task
        argv = ["train", task, "--preset", name, "--output", str(output), *scaled_down(preset, task)]
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, f"{name} / {task}: {err[-2000:]}"
        assert (output / ADAPTER_FILE[task]).is_file()
        assert (output / "checkpoints" / "step-000002").is_dir()
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        losses = [record["loss"] for record in records if record.get("loss") is not None]
        assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
        if preset.get("train", {}).get("ema_decay"):
            assert any(output.glob("*ema*.safetensors"))
