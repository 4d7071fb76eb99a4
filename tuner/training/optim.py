"""Optimizers and learning-rate schedules, chosen by name."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LRScheduler

from tuner.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "sgd")
SCHEDULERS = ("constant", "cosine", "linear")


def build_optimizer(
    name: str,
    params: Iterable | list[dict],
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    device_type: str = "cpu",
) -> torch.optim.Optimizer:
    """`adamw`, `adamw8bit`, `prodigy`, `adafactor`, `sgd`, or an import path `package.module.ClassName`."""
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **_adamw_kernel(device_type)
        )
    if name == "adamw8bit":
        if device_type != "cuda":
            raise ConfigError(
                f"optim.name: adamw8bit runs on CUDA only, this run is on {device_type}",
                hint="use optim.name=adamw",
            )
        bnb_optim = _import_optional("bitsandbytes.optim", name, "bitsandbytes")
        return bnb_optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "prodigy":
        prodigyopt = _import_optional("prodigyopt", name, "prodigyopt")
        return prodigyopt.Prodigy(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # Adafactor's own defaults derive the lr from the step count and ignore `lr`; we want ours.
        return Adafactor(
            params,
            lr=lr,
            weight_decay=weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if "." in name:
        return _optimizer_from_import_path(
            name, params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps
        )
    close = difflib.get_close_matches(name, OPTIMIZERS, n=1)
    raise ConfigError(
        f"optim.name: unknown optimizer {name!r}",
        hint=(f"did you mean {close[0]!r}? " if close else "")
        + f"choose one of {', '.join(OPTIMIZERS)} or an import path like torch.optim.RAdam",
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int
) -> LRScheduler:
    """`constant`, `cosine` (to 0) or `linear` (to 0), each after a linear warmup of warmup_steps.

    total_steps counts optimizer steps; the training loop steps the schedule once per optimizer
    step whatever the number of processes.
    """
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if name == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)
    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, num_training_steps=total_steps)
    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, num_training_steps=total_steps)
    close = difflib.get_close_matches(name, SCHEDULERS, n=1)
    raise ConfigError(
        f"optim.scheduler: unknown schedule {name!r}",
        hint=(f"did you mean {close[0]!r}? " if close else "") + f"choose one of {', '.join(SCHEDULERS)}",
    )


def _adamw_kernel(device_type: str) -> dict[str, bool]:
    # The fused kernel updates all parameters in one launch. torch lists the devices that have it
    # (once torch_npu is imported, its backend name "npu" is in the list); the helper is private
    # to torch (2.14), so fall back to foreach when it moves.
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused_devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        fused_devices = {"cuda"}
    if device_type in ("cuda", "npu") and device_type in fused_devices:
        return {"fused": True}
    return {"foreach": True}


def _import_optional(module: str, optimizer: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(
            f"optim.name: {optimizer} needs the {package} package, which is not installed ({error})",
            hint=f"pip install {package}, or use optim.name=adamw",
        ) from error


def _optimizer_from_import_path(path: str, params, **settings) -> torch.optim.Optimizer:
    module_name, _, class_name = path.rpartition(".")
    try:
        optimizer_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"optim.name: cannot import optimizer {path!r} ({error})",
            hint="give a full import path such as torch.optim.RAdam, with its package installed",
        ) from error
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ConfigError(
            f"optim.name: {path!r} is not a torch.optim.Optimizer class",
            hint="name an optimizer class, e.g. torch.optim.RAdam",
        )
    # Pass only the settings this class takes (e.g. SGD has no betas).
    accepted = inspect.signature(optimizer_class).parameters
    return optimizer_class(params, **{key: value for key, value in settings.items() if key in accepted})
