"""Several processes, one run: relaunching through Accelerate, sharding strategies, per-sample seeds.

What a distributed run looks like to the rest of tuner:

* **Processes** come from `accelerate launch` (never a home-made launcher): `tuner train ...
  --num-processes N` re-executes itself through `relaunch_command`, and `tuner launch` does the same
  from a cluster's environment (`tuner.launch`). On CPU the processes join one gloo group only with
  `--multi_gpu` plus `Accelerator(cpu=True)` (accelerate 1.15's `--cpu` starts a single process).
* **Data**: the loop's batch sampler is sharded by Accelerate, whole batches dealt to the processes in
  turn. When the number of batches in an epoch is not a multiple of the process count, Accelerate's
  `even_batches` repeats the epoch's first batches to fill the last round, so a few samples are seen
  twice in that epoch; nothing is dropped.
* **Strategy** (`runtime.distributed`): `ddp` (the default), `zero2` / `zero3` (DeepSpeed, an optional
  extra) or `fsdp`, turned into Accelerate's plugins by `build_distributed_accelerator`.
* **Noise**: SDXL draws each sample's noise and timestep from a generator seeded by (seed, sample index,
  epoch) (`PerSampleSeeds`; the loop's `SampleKey` carries the epoch), not from the per-process RNG,
  so a 2-process run with batch b trains the same adapter as a 1-process run with batch 2b.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from tuner.data.sampling import epoch_of
from tuner.errors import ConfigError
from tuner.launch import DEFAULT_PORT, ClusterTopology, accelerate_command

if TYPE_CHECKING:
    import accelerate

    from tuner.runtime.device import Runtime

DistributedStrategy = Literal["ddp", "zero2", "zero3", "fsdp"]
DISTRIBUTED_STRATEGIES: tuple[str, ...] = ("ddp", "zero2", "zero3", "fsdp")
DEEPSPEED_INSTALL_HINT = "pip install 'tuner[deepspeed]' (on Ascend, also the deepspeed-npu integration)"
# The flags `tuner train` handles itself; they are not passed on to the relaunched processes.
LAUNCH_FLAGS = (
    "--num-processes",
    "--num-machines",
    "--machine-rank",
    "--main-process-ip",
    "--main-process-port",
)
# Set by torchrun / accelerate launch in every process they start.
_LAUNCHED_VARIABLES = ("LOCAL_RANK", "WORLD_SIZE")


def launched_rank(env: dict[str, str] | os._Environ = os.environ) -> int:
    """This process's global rank under torchrun or accelerate launch; 0 when not launched."""
    return int(env.get("RANK", "0"))


def already_launched(env: dict[str, str] | os._Environ = os.environ) -> bool:
    """True inside a process started by torchrun or accelerate launch."""
    return any(name in env for name in _LAUNCHED_VARIABLES)


def relaunch_command(
    tuner_args: Sequence[str],
    *,
    num_processes: int,
    device_type: str,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int = DEFAULT_PORT,
    mixed_precision: str | None = None,
    python: str = sys.executable,
) -> list[str]:
    """`python -m accelerate.commands.launch ... -m tuner <tuner_args>` for `num_processes` per machine.

    `tuner_args` are the arguments after `tuner` with the launch flags removed (see
    `strip_launch_flags`). Built by `tuner.launch.accelerate_command`, so a relaunch and `tuner launch`
    start processes the same way; `python -m` keeps the relaunch inside this interpreter's environment.
    """
    if num_processes < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise ConfigError(
            f"cannot launch {num_processes} process(es) per machine on machine {machine_rank} "
            f"of {num_machines}",
            hint="use --num-processes >= 1, --num-machines >= 1 and 0 <= --machine-rank < --num-machines",
        )
    topology = ClusterTopology(
        platform="flags",
        num_machines=num_machines,
        machine_rank=machine_rank,
        main_process_ip=main_process_ip,
        main_process_port=main_process_port,
        processes_per_machine=num_processes,
    )
    command = accelerate_command(
        topology, tuner_args, device_type=device_type, mixed_precision=mixed_precision
    )
    if device_type == "cpu" and num_processes * num_machines > 1:
        # accelerate 1.15 has no multi-CPU flag: --multi_gpu starts the processes, and
        # Accelerator(cpu=True) (tuner's build_accelerator on CPU) makes them join one gloo group.
        command.insert(command.index("-m"), "--multi_gpu")
    # Said explicitly so accelerate does not warn that it fell back to its defaults for them.
    command.insert(command.index("-m"), "--dynamo_backend=no")
    return [python, "-m", "accelerate.commands.launch", *command[2:]]


def strip_launch_flags(argv: Sequence[str]) -> list[str]:
    """`argv` without LAUNCH_FLAGS and their values (`--flag value` and `--flag=value` forms)."""
    kept: list[str] = []
    skip_value = False
    for argument in argv:
        if skip_value:
            skip_value = False
            continue
        name = argument.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip_value = "=" not in argument
            continue
        kept.append(argument)
    return kept


def describe_global_batch(per_device_batch: int, num_processes: int, grad_accum: int, lr: float) -> str:
    """The line every run prints at start: how the global batch is made, and the learning rate used."""
    global_batch = per_device_batch * num_processes * grad_accum
    return (
        f"global batch {global_batch} = {per_device_batch} per device x {num_processes} process(es) "
        f"x {grad_accum} grad-accum; lr {lr:g} (not scaled with the global batch)"
    )


def build_distributed_accelerator(
    runtime: Runtime,
    grad_accum: int = 1,
    project_dir: Path | None = None,
    *,
    strategy: str = "ddp",
    per_device_batch: int = 1,
    max_grad_norm: float | None = None,
) -> accelerate.Accelerator:
    """An Accelerator for `runtime` with the sharding `strategy` (`runtime.distributed`).

    `ddp` is `tuner.runtime.build_accelerator` unchanged. `zero2`/`zero3` pass a DeepSpeed config
    (`deepspeed_config`) to Accelerate's DeepSpeedPlugin; `fsdp` passes a FullyShardedDataParallelPlugin
    that wraps transformer blocks and keeps the original parameters (LoRA mixes frozen and trainable
    parameters in one block, which flat parameters without use_orig_params refuse).
    """
    from tuner.runtime.device import build_accelerator

    if strategy not in DISTRIBUTED_STRATEGIES:
        raise ConfigError(
            f"unknown runtime.distributed {strategy!r}",
            hint=f"choose one of {', '.join(DISTRIBUTED_STRATEGIES)}",
        )
    if strategy == "ddp":
        return build_accelerator(runtime, grad_accum, project_dir)
    if runtime.device_type == "cpu":
        # Accelerate 1.15 ignores both plugins with cpu=True and runs plain DDP: say so instead.
        raise ConfigError(
            f"runtime.distributed={strategy} shards the model across CUDA or NPU devices; this run is on CPU",
            hint="use runtime.distributed=ddp on CPU",
        )
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    plugins: dict[str, Any] = {}
    if strategy in ("zero2", "zero3"):
        require_deepspeed(strategy)
        config = deepspeed_config(
            int(strategy[-1]), per_device_batch, grad_accum, max_grad_norm, runtime.mixed_precision
        )
        plugins["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=config)
    else:
        plugins["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            auto_wrap_policy="transformer_based_wrap",
            use_orig_params=True,
            state_dict_type="FULL_STATE_DICT",
            cpu_ram_efficient_loading=False,
        )
    return Accelerator(
        cpu=runtime.device_type == "cpu",
        mixed_precision=runtime.mixed_precision,
        gradient_accumulation_steps=grad_accum,
        project_dir=str(project_dir) if project_dir is not None else None,
        **plugins,
    )


def require_deepspeed(strategy: str) -> None:
    """Fail with an install hint when DeepSpeed (an optional extra) is missing."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"runtime.distributed={strategy} needs DeepSpeed, which is not installed ({error})",
            hint=f"{DEEPSPEED_INSTALL_HINT}, or use runtime.distributed=ddp or fsdp",
        ) from None


def deepspeed_config(
    zero_stage: int,
    per_device_batch: int,
    grad_accum: int,
    max_grad_norm: float | None,
    mixed_precision: str,
) -> dict[str, Any]:
    """A DeepSpeed ZeRO-2/3 config with every value filled in.

    Accelerate fills `"auto"` batch sizes from the data loader's batch_size, which tuner's loader does
    not have (its batch sampler deals batches of any size), so nothing here is left `"auto"`.
    ZeRO-3 gathers the 16-bit weights on save, so `accelerator.get_state_dict` returns full tensors.
    """
    if zero_stage not in (2, 3):
        raise ValueError(f"ZeRO stage must be 2 or 3, got {zero_stage}")
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if zero_stage == 3:
        zero |= {"stage3_gather_16bit_weights_on_model_save": True, "stage3_prefetch_bucket_size": 5e8}
    else:
        zero |= {"allgather_partitions": True, "allgather_bucket_size": 5e8, "reduce_scatter": True}
    return {
        "train_micro_batch_size_per_gpu": per_device_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm if max_grad_norm is not None else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def gathered_state_dict(accelerator: accelerate.Accelerator) -> dict | None:
    """The full state dict of the model the loop prepared, for saving under ZeRO-3 / FSDP.

    Every process must call it (the shards are gathered with collectives); only the main process
    gets the tensors, the others None. Under DDP or a single process nothing needs gathering: None
    everywhere, and the caller saves the unwrapped model as usual.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return None
    # Accelerate 1.15 keeps what prepare() returned (the DeepSpeed engine, the FSDP wrapper) in
    # _models; get_state_dict needs that object, not the unwrapped model the recipe holds.
    prepared = accelerator._models[-1]
    state_dict = accelerator.get_state_dict(prepared)
    return state_dict if accelerator.is_main_process else None


def sample_seed(seed: int, index: int, epoch: int) -> int:
    """A 63-bit seed for sample `index` in `epoch`: the same in any process, batch or resume."""
    digest = hashlib.sha256(f"{seed}:{index}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class PerSampleSeeds(torch.utils.data.Dataset):
    """`dataset` whose items also carry `sample_seed` (a 0-d int64 tensor) from (seed, index, epoch).

    The loss seeds each sample's random draws with it, so what a sample draws does not depend on
    which process, worker, batch or micro-batch it lands in. The epoch comes with the key (a
    `SampleKey` from the training loop; a plain index is epoch 0), never from an attribute.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict[str, Any]:
        item = self.dataset[key]
        return {**item, "sample_seed": torch.tensor(sample_seed(self.seed, int(key), epoch_of(key)))}
