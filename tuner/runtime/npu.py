"""Everything that touches torch_npu. It is imported lazily, only here.

torch_npu is never installed on development or CI machines (importing torch with torch_npu present but
no CANN toolkit fails), so every path below is unit-tested with `probe_npu` / `import_torch_npu`
replaced, and none of it has been run on Ascend hardware from this repository.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from types import ModuleType

# Environment defaults for Ascend training, applied only where the user has not set the variable.
# torch_npu and CANN read these when the device runtime initializes (first NPU operation), which
# happens after `resolve_runtime` returns, so setting them from Python here is early enough.
NPU_ENV_DEFAULTS: dict[str, str] = {
    # Bucketed SDXL images and variable-length Qwen-VL sequences allocate many differently sized
    # blocks; expandable segments grow one mapping instead of fragmenting the caching allocator.
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
    # Level 2 moves most operator dispatch work onto the task-queue thread, so the Python thread
    # keeps ahead of the device (Ascend's recommended setting for training).
    "TASK_QUEUE_ENABLE": "2",
    # Binds the main and task-queue threads to cores near the NPU; without it the scheduler moves
    # them across NUMA nodes and step times jitter.
    "CPU_AFFINITY_CONF": "1",
    # The HCCL default (120 s) is shorter than the first step of a multi-card run, where each rank
    # loads weights and compiles kernels at its own pace; a timeout there kills the job.
    "HCCL_CONNECT_TIMEOUT": "1200",
    # aclnn caches one executor per operator and shape (default 10000 entries); aspect buckets and
    # variable sequence lengths exceed that and re-build executors every step.
    "ACLNN_CACHE_LIMIT": "100000",
}


@dataclass(frozen=True)
class NpuProbe:
    """What this machine says about Ascend NPUs. Never raises: failures land in `import_error`."""

    installed: bool
    torch_npu_version: str | None = None
    import_error: str | None = None
    device_count: int = 0
    bf16_supported: bool = False
    device_names: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return self.import_error is None and self.device_count > 0


def import_torch_npu() -> ModuleType:
    """Import torch_npu (which registers `torch.npu`). Raises whatever the import raises."""
    return importlib.import_module("torch_npu")


def probe_npu() -> NpuProbe:
    """Look for torch_npu and NPUs without letting any failure escape."""
    if importlib.util.find_spec("torch_npu") is None:
        return NpuProbe(installed=False)
    try:
        torch_npu = import_torch_npu()
    # A native extension can fail with OSError (missing libascendcl.so / libhccl.so when CANN's
    # set_env.sh was not sourced) or RuntimeError, not only ImportError.
    except Exception as error:
        return NpuProbe(installed=True, import_error=f"{type(error).__name__}: {error}")
    version = getattr(torch_npu, "__version__", None)
    try:
        count = int(torch_npu.npu.device_count())
        names = tuple(str(torch_npu.npu.get_device_name(index)) for index in range(count))
        # 910B (Atlas A2) and later support bf16; 910A (Atlas training series) is fp16-only.
        bf16 = bool(count) and bool(torch_npu.npu.is_bf16_supported())
    except Exception as error:
        return NpuProbe(
            installed=True, torch_npu_version=version, import_error=f"{type(error).__name__}: {error}"
        )
    return NpuProbe(
        installed=True, torch_npu_version=version, device_count=count, bf16_supported=bf16, device_names=names
    )


def apply_npu_defaults(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Apply Ascend training defaults the user has not set; return what was set.

    Environment variables in `env` are only added, never overwritten (an HCCL_CONNECT_TIMEOUT the
    user chose stays, even a low one). The two torch_npu switches have no environment form and are
    set whenever torch_npu imports.
    """
    applied: dict[str, str] = {}
    for name, value in NPU_ENV_DEFAULTS.items():
        if name not in env:
            env[name] = value
            applied[name] = value
    try:
        torch_npu = import_torch_npu()
    except Exception:
        return applied
    # Binary (precompiled) kernels instead of compiling each operator for each new shape: with
    # aspect buckets online compilation stalls every step that meets a new shape. Already the
    # default on 910B, not on 910A.
    torch_npu.npu.set_compile_mode(jit_compile=False)
    applied["torch.npu.set_compile_mode"] = "jit_compile=False"
    # Private layouts (NZ, 5HD) insert TransData casts around every op that lacks them and leak
    # into saved tensors; the plain ND layout is what the binary kernels expect.
    torch_npu.npu.config.allow_internal_format = False
    applied["torch.npu.config.allow_internal_format"] = "False"
    return applied


@functools.cache
def fused_adamw_failure(device: str = "npu") -> str | None:
    """None when torch's fused AdamW takes one step on `device` and lands where the foreach AdamW does;
    otherwise why not. Run once per process.

    torch lists its privateuse1 backend (torch_npu's `npu`) among the fused-capable devices whatever the
    backend implements, so on NPU the list proves nothing: only a step does.
    """
    import torch

    try:
        results = []
        for kernel in ({"fused": True}, {"foreach": True}):
            weight = torch.linspace(-1.0, 1.0, 64, device=device).requires_grad_()
            weight.grad = torch.linspace(0.5, -0.5, 64, device=device)
            torch.optim.AdamW([weight], lr=0.1, weight_decay=0.01, **kernel).step()
            results.append(weight.detach().cpu())
        fused, foreach = results
        if not torch.allclose(fused, foreach, rtol=1e-4, atol=1e-6):
            gap = (fused - foreach).abs().max().item()
            return f"its step differs from foreach AdamW's by up to {gap:.3g}"
    except Exception as error:  # a missing kernel or a device error: either way, not usable
        first_line = (str(error).splitlines() or [""])[0]
        return f"{type(error).__name__}: {first_line}"
    return None
