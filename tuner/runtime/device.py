"""Which device and precision a run uses, and the Accelerator and attention processors that follow."""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from tuner.errors import ConfigError, DeviceError
from tuner.runtime import npu

if TYPE_CHECKING:
    import accelerate

DeviceType = Literal["cpu", "cuda", "npu"]
Precision = Literal["no", "fp16", "bf16"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "npu")
PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
VISIBLE_DEVICES_VARIABLE: dict[str, str] = {
    "npu": "ASCEND_RT_VISIBLE_DEVICES",
    "cuda": "CUDA_VISIBLE_DEVICES",
}
_DEVICE_LIST = re.compile(r"^\d+(,\d+)*$")
_COMPUTE_DTYPES: dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Runtime:
    device_type: DeviceType
    device_count: int
    mixed_precision: Precision

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype frozen weights are stored in: trainable LoRA weights stay fp32 under autocast."""
        return _COMPUTE_DTYPES[self.mixed_precision]


@dataclass(frozen=True)
class CudaProbe:
    device_count: int = 0
    bf16_supported: bool = False
    device_names: tuple[str, ...] = ()
    error: str | None = None


def probe_cuda() -> CudaProbe:
    """Look for CUDA devices without letting any failure escape."""
    try:
        if not torch.cuda.is_available():
            return CudaProbe()
        count = torch.cuda.device_count()
        names = tuple(torch.cuda.get_device_name(index) for index in range(count))
        # Without emulation: pre-Ampere cards "support" bf16 only through slow emulated kernels,
        # so fp16 is the right automatic choice there.
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except Exception as error:
        return CudaProbe(error=f"{type(error).__name__}: {error}")
    return CudaProbe(device_count=count, bf16_supported=bf16, device_names=names)


def parse_devices(devices: str) -> str:
    """Normalize a `--devices` list such as "0, 1" to "0,1"; reject anything else."""
    normalized = devices.replace(" ", "")
    indices = normalized.split(",")
    if not _DEVICE_LIST.match(normalized) or len(set(indices)) != len(indices):
        raise ConfigError(
            f"devices {devices!r} is not a list of distinct device indices",
            hint="use comma-separated indices without repeats, e.g. --devices 0,1",
        )
    return normalized


def choose_runtime(
    device: str, mixed_precision: str, npu_probe: npu.NpuProbe, cuda_probe: CudaProbe
) -> Runtime:
    """The device and precision policy, given what the probes found. Pure: sets nothing."""
    if device not in DEVICE_CHOICES:
        raise ConfigError(f"unknown device {device!r}", hint=f"choose one of {', '.join(DEVICE_CHOICES)}")
    if mixed_precision not in PRECISION_CHOICES:
        raise ConfigError(
            f"unknown mixed_precision {mixed_precision!r}",
            hint=f"choose one of {', '.join(PRECISION_CHOICES)}",
        )
    if device == "auto":
        device = "npu" if npu_probe.available else "cuda" if cuda_probe.device_count else "cpu"

    if device == "npu":
        _require_npu(npu_probe)
        count, bf16 = npu_probe.device_count, npu_probe.bf16_supported
        no_bf16_hint = "this NPU (910A / Atlas training series) is fp16-only: use --mixed-precision fp16"
    elif device == "cuda":
        if not cuda_probe.device_count:
            detail = f" ({cuda_probe.error})" if cuda_probe.error else ""
            raise DeviceError(
                f"CUDA was requested but torch sees no CUDA device{detail}",
                hint="check nvidia-smi, CUDA_VISIBLE_DEVICES and that torch is a CUDA build, "
                "or use --device auto / --device cpu",
            )
        count, bf16 = cuda_probe.device_count, cuda_probe.bf16_supported
        no_bf16_hint = "this GPU has no native bf16 (pre-Ampere): use --mixed-precision fp16"
    else:
        if mixed_precision == "fp16":
            raise DeviceError(
                "fp16 mixed precision is not available on CPU",
                hint="use --mixed-precision no (fp32) or bf16 on CPU",
            )
        return Runtime("cpu", 1, "no" if mixed_precision == "auto" else mixed_precision)  # type: ignore[arg-type]

    if mixed_precision == "auto":
        mixed_precision = "bf16" if bf16 else "fp16"
    elif mixed_precision == "bf16" and not bf16:
        raise DeviceError(
            f"bf16 mixed precision is not supported on this {device.upper()}", hint=no_bf16_hint
        )
    return Runtime(device, count, mixed_precision)  # type: ignore[arg-type]


def _require_npu(probe: npu.NpuProbe) -> None:
    if not probe.installed:
        raise DeviceError(
            "an Ascend NPU was requested but torch_npu is not installed",
            hint="on an Ascend host: pip install 'tuner[ascend]' (torch_npu X.Y needs torch X.Y)",
        )
    if probe.import_error is not None:
        raise DeviceError(
            f"an Ascend NPU was requested but torch_npu failed: {probe.import_error}",
            hint="source the CANN toolkit first: source /usr/local/Ascend/ascend-toolkit/set_env.sh; "
            "run `tuner env` for a pre-flight check",
        )
    if not probe.device_count:
        raise DeviceError(
            "an Ascend NPU was requested but torch_npu sees no device",
            hint="check npu-smi info and ASCEND_RT_VISIBLE_DEVICES",
        )


def resolve_runtime(
    device: str = "auto", mixed_precision: str = "auto", devices: str | None = None
) -> Runtime:
    """Pick device and precision (auto: NPU, else CUDA, else CPU), restrict devices, apply NPU defaults.

    Call it before any model touches a device: the visible-devices variables and the NPU defaults are
    read when the device runtime initializes.
    """
    env = os.environ
    device_list = parse_devices(devices) if devices is not None else None
    # Visible devices must be set before probing, because probing CUDA (bf16 support) initializes
    # it. Under auto the target is not known yet: restrict both while probing, keep only the chosen.
    candidates = [device] if device in VISIBLE_DEVICES_VARIABLE else list(VISIBLE_DEVICES_VARIABLE)
    previous = {name: env.get(name) for name in VISIBLE_DEVICES_VARIABLE.values()}
    if device_list is not None and device != "cpu":
        for candidate in candidates:
            env[VISIBLE_DEVICES_VARIABLE[candidate]] = device_list
    try:
        runtime = choose_runtime(device, mixed_precision, npu.probe_npu(), probe_cuda())
    finally:
        if device_list is not None:
            for name, value in previous.items():
                _restore(env, name, value)
    if device_list is not None:
        if runtime.device_type == "cpu":
            raise DeviceError(
                f"devices {device_list} were requested but the run resolved to CPU",
                hint="drop --devices for CPU runs, or check that the accelerator is visible (tuner env)",
            )
        env[VISIBLE_DEVICES_VARIABLE[runtime.device_type]] = device_list
    if runtime.device_type == "npu":
        npu.apply_npu_defaults(env)
    return runtime


def pin_memory_for(device_type: str, asked: bool | None) -> bool:
    """Whether the data loader pins the host memory of batches (`data.pin_memory`; None: on CUDA only).

    On CUDA pinned pages make the host-to-device copy faster. On NPU they come from torch_npu's host
    allocator, which no run of this project has measured (unverified on hardware): opt-in there. The
    CPU has nothing to copy to.
    """
    if asked is not None:
        return asked
    return device_type == "cuda"


def set_cpu_threads(num_threads: int | None) -> None:
    """`runtime.num_threads`: torch's CPU threads per process (CPU training, data preparation on the CPU);
    None keeps torch's default (one per core). Several processes on one machine each take this many."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def build_accelerator(
    runtime: Runtime, grad_accum: int = 1, project_dir: Path | None = None, log_with: str | None = None
) -> accelerate.Accelerator:
    """An Accelerator for this runtime. Gradient accumulation and mixed precision are Accelerate's."""
    from accelerate import Accelerator

    return Accelerator(
        # accelerate 1.15: without cpu=True, processes started by torchrun on a CPU machine each
        # train alone (DistributedType.NO) instead of joining one gloo group.
        cpu=runtime.device_type == "cpu",
        mixed_precision=runtime.mixed_precision,
        gradient_accumulation_steps=grad_accum,
        project_dir=str(project_dir) if project_dir is not None else None,
        log_with=log_with,
    )


def configure_unet_attention(unet: torch.nn.Module, runtime: Runtime) -> None:
    """Use torch_npu's fused attention for a diffusers UNet on NPU; elsewhere keep diffusers' SDPA default."""
    if runtime.device_type != "npu":
        return
    from diffusers.models.attention_processor import AttnProcessorNPU

    # diffusers 0.42: AttnProcessorNPU calls torch_npu.npu_fusion_attention for fp16/bf16 inputs
    # and falls back to SDPA for fp32, so it is safe under every NPU precision.
    unet.set_attn_processor(AttnProcessorNPU())


def _restore(env: MutableMapping[str, str], name: str, value: str | None) -> None:
    if value is None:
        env.pop(name, None)
    else:
        env[name] = value


def release_host_memory() -> None:
    """Return the host heap freed by a finished phase (SDXL caching) to the OS.

    glibc keeps freed memory mapped, and the caching pass's encoder activations leave a heap that the
    training step's differently sized tensors only partly reuse: trimming it keeps the host's peak
    near that of training alone. A no-op where glibc is absent (macOS, musl).
    """
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# Device types whose RNG state accelerate 1.15's save_state keeps (checkpointing.py saves the CPU,
# CUDA and XPU generators); for any other device the loop saves it itself.
_RNG_SAVED_BY_ACCELERATE = ("cpu", "cuda", "xpu")


def device_rng_state(device: torch.device) -> list[torch.Tensor] | None:
    """The RNG states of every device of `device`'s type that Accelerate does not save (NPU), else None.

    Without them a resumed run on Ascend draws other dropout masks than the uninterrupted one did.
    """
    if device.type in _RNG_SAVED_BY_ACCELERATE:
        return None
    return torch.get_device_module(device.type).get_rng_state_all()


def restore_device_rng_state(device: torch.device, states: list[torch.Tensor]) -> None:
    torch.get_device_module(device.type).set_rng_state_all(states)
