"""Relaunch commands, sharding strategies and per-sample seeds (the multi-process runs themselves are in
tests/distributed/)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from tuner.data.sampling import SampleKey
from tuner.distributed import (
    PerSampleSeeds,
    build_distributed_accelerator,
    deepspeed_config,
    describe_global_batch,
    relaunch_command,
    strip_launch_flags,
)
from tuner.errors import ConfigError
from tuner.models.sdxl_loss import NoiseSettings, seeded_noise_and_timesteps
from tuner.runtime.device import Runtime

TRAIN_ARGS = ["train", "sdxl-lora", "--data", "d", "--output", "o"]


def test_cpu_relaunch_uses_multi_gpu_so_two_processes_join_one_gloo_group():
    command = relaunch_command(TRAIN_ARGS, num_processes=2, device_type="cpu", mixed_precision="no")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in command and "--cpu" not in command
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("-m", 3) :] == ["-m", "tuner", *TRAIN_ARGS]


def test_multi_machine_relaunch_names_the_main_process_and_counts_all_processes():
    command = relaunch_command(
        TRAIN_ARGS,
        num_processes=8,
        device_type="npu",
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
        main_process_port=29600,
    )
    value = {flag: command[command.index(flag) + 1] for flag in ("--num_processes", "--machine_rank")}
    assert value == {"--num_processes": "16", "--machine_rank": "1"}
    assert command[command.index("--main_process_ip") + 1] == "10.0.0.1"
    assert command[command.index("--main_process_port") + 1] == "29600"
    with pytest.raises(ConfigError, match="master address"):
        relaunch_command(TRAIN_ARGS, num_processes=8, device_type="npu", num_machines=2)
    with pytest.raises(ConfigError, match="machine 2 of 2"):
        relaunch_command(TRAIN_ARGS, num_processes=8, device_type="npu", num_machines=2, machine_rank=2)


def test_launch_flags_are_not_passed_on_to_the_launched_processes():
    argv = [*TRAIN_ARGS, "--num-processes", "2", "--main-process-ip=10.0.0.1", "--set", "train.seed=1"]
    assert strip_launch_flags(argv) == [*TRAIN_ARGS, "--set", "train.seed=1"]


def test_global_batch_is_per_device_times_processes_times_accumulation():
    line = describe_global_batch(per_device_batch=2, num_processes=4, grad_accum=3, lr=1e-4)
    assert line.startswith("global batch 24 = 2 per device x 4 process(es) x 3 grad-accum; lr 0.0001")


def test_deepspeed_configs_leave_nothing_to_infer_from_the_data_loader():
    zero3 = deepspeed_config(3, per_device_batch=2, grad_accum=4, max_grad_norm=1.0, mixed_precision="bf16")
    assert zero3["train_micro_batch_size_per_gpu"] == 2 and zero3["gradient_accumulation_steps"] == 4
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero3["bf16"]["enabled"] and not zero3["fp16"]["enabled"]
    zero2 = deepspeed_config(2, per_device_batch=1, grad_accum=1, max_grad_norm=None, mixed_precision="fp16")
    assert zero2["zero_optimization"]["stage"] == 2 and zero2["fp16"]["enabled"]
    assert "auto" not in repr(zero2) + repr(zero3)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_zero3_without_deepspeed_names_the_extra_to_install():
    with pytest.raises(ConfigError) as raised:
        build_distributed_accelerator(Runtime("npu", 8, "bf16"), strategy="zero3")
    assert "pip install 'tuner[deepspeed]'" in raised.value.hint


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp"])
def test_sharding_strategies_are_refused_on_cpu_instead_of_silently_running_ddp(strategy):
    with pytest.raises(ConfigError, match="this run is on CPU"):
        build_distributed_accelerator(Runtime("cpu", 1, "no"), strategy=strategy)


def test_unknown_strategy_is_refused():
    with pytest.raises(ConfigError, match=r"unknown runtime\.distributed 'zero4'"):
        build_distributed_accelerator(Runtime("cpu", 1, "no"), strategy="zero4")


class _Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict:
        return {"index": index}


def test_sample_seeds_depend_on_seed_index_and_epoch_only():
    dataset = PerSampleSeeds(_Items(), seed=5)
    first = [int(dataset[i]["sample_seed"]) for i in range(3)]
    assert len(set(first)) == 3 and dataset[1]["index"] == 1
    assert int(PerSampleSeeds(_Items(), seed=5)[2]["sample_seed"]) == first[2]
    assert int(dataset[SampleKey(0, 0)]["sample_seed"]) == first[0]
    assert int(dataset[SampleKey(0, 1)]["sample_seed"]) != first[0]


def test_a_samples_noise_does_not_depend_on_its_batch():
    settings = NoiseSettings(prediction_type="epsilon", noise_offset=0.1, pyramid_noise_discount=0.5)
    latents = torch.zeros(3, 4, 8, 8)
    seeds = torch.tensor([11, 22, 33])
    noise, timesteps = seeded_noise_and_timesteps(latents, settings, seeds, "cpu")
    torch.manual_seed(0)  # the global RNG plays no part
    alone, alone_timestep = seeded_noise_and_timesteps(latents[2:], settings, seeds[2:], "cpu")
    torch.testing.assert_close(alone[0], noise[2], rtol=0, atol=0)
    assert alone_timestep[0] == timesteps[2]
    assert not torch.equal(noise[0], noise[1])
