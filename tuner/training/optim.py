"""Optimizers and learning-rate schedules, chosen by name."""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from tuner.errors import ConfigError
from tuner.runtime import npu

logger = logging.getLogger(__name__)

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


def lora_plus_groups(
    groups: list[dict], modules: Iterable[torch.nn.Module | None], lr: float, lr_ratio: float | None
) -> list[dict]:
    """LoRA+ (Hayou et al. 2024; kohya's `loraplus_lr_ratio`, PEFT's `create_loraplus_optimizer`): each
    group's LoRA B matrices move to a group of their own at `lr_ratio` times the group's lr (`lr` for a
    group without one); A matrices, DoRA magnitudes and everything else keep theirs. `modules` are the
    models holding the parameters (PEFT names B `...lora_B.<adapter>.weight`). None leaves `groups` as
    they are. A ratio that finds no B matrix (LoKr and LoHa have none) is refused: it would act on nothing.
    """
    if lr_ratio is None:
        return groups
    b_matrices = {
        id(parameter)
        for module in modules
        if module is not None
        for name, parameter in module.named_parameters()
        if ".lora_B." in name
    }
    split = []
    for group in groups:
        params = list(group["params"])
        a_part = [parameter for parameter in params if id(parameter) not in b_matrices]
        b_part = [parameter for parameter in params if id(parameter) in b_matrices]
        if a_part:
            split.append({**group, "params": a_part})
        if b_part:
            b_group = {**group, "params": b_part, "lr": group.get("lr", lr) * lr_ratio}
            if "name" in group:
                b_group["name"] = f"{group['name']} B"
            split.append(b_group)
    if not b_matrices:
        raise ConfigError(
            f"lora.lr_ratio={lr_ratio} is set, but the adapter has no LoRA B matrices",
            hint="LoRA+ applies to lora.variant lora and dora; remove lora.lr_ratio for lokr/loha",
        )
    return split


@dataclass
class ScheduleShape:
    """The lr multiplier at a step: a linear warmup, then constant, cosine to 0 or linear to 0 at
    `total_steps` (the curves of transformers' get_*_schedule_with_warmup).

    A callable object, not a closure: LambdaLR saves its attributes in its state dict, so a checkpoint
    keeps the schedule's length and a run resumed with another max_steps follows the same curve
    unless it asks to stretch it (`fit_schedule_on_resume`).
    """

    name: str
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.name == "constant":
            return 1.0
        # Past total_steps (a resumed run that kept the schedule's length) the lr stays at 0; the
        # cosine of transformers 5.23 would climb back up.
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """`constant`, `cosine` (to 0) or `linear` (to 0), each after a linear warmup of warmup_steps.

    total_steps counts optimizer steps; the training loop steps the schedule once per optimizer
    step whatever the number of processes.
    """
    if name not in SCHEDULERS:
        close = difflib.get_close_matches(name, SCHEDULERS, n=1)
        raise ConfigError(
            f"optim.scheduler: unknown schedule {name!r}",
            hint=(f"did you mean {close[0]!r}? " if close else "") + f"choose one of {', '.join(SCHEDULERS)}",
        )
    return LambdaLR(optimizer, ScheduleShape(name, warmup_steps, total_steps))


def fit_schedule_on_resume(scheduler: LRScheduler, max_steps: int, extend: bool) -> str | None:
    """After a checkpoint restored `scheduler`, say what a run to `max_steps` does with its length.

    The schedule keeps the length it was built with (resuming with a higher max_steps must not jump
    the lr back up the curve) unless `extend` stretches it to `max_steps` from the current step on.
    Returns the line to print, or None when the length does not matter.
    """
    shapes = [fn for fn in getattr(scheduler, "lr_lambdas", []) if isinstance(fn, ScheduleShape)]
    if not shapes or shapes[0].name == "constant" or shapes[0].total_steps == max_steps:
        return None
    shape, step = shapes[0], scheduler.last_epoch
    before = f"{shape.name} over {shape.total_steps} steps (lr now {scheduler.get_last_lr()[0]:.4g})"
    if not extend:
        return (
            f"lr schedule: {before}, kept from the checkpoint although this run trains to step "
            f"{max_steps}; --set train.extend_schedule=true stretches it over {max_steps} steps"
        )
    for fn in shapes:
        fn.total_steps = max_steps
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    return f"lr schedule: {before} stretched to {max_steps} steps (lr now {lrs[0]:.4g} at step {step})"


def _adamw_kernel(device_type: str) -> dict[str, bool]:
    # The fused kernel updates all parameters in one launch. torch lists the devices that have it; the
    # helper is private to torch (2.14), so fall back to foreach when it moves.
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused_devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        fused_devices = {"cuda"}
    if device_type == "cuda" and "cuda" in fused_devices:
        return {"fused": True}
    if device_type == "npu" and "npu" in fused_devices:
        # Once torch_npu is imported its backend name is in the list whether or not torch_npu has the
        # kernel: fused only after one real step of it worked.
        failure = npu.fused_adamw_failure("npu")
        if failure is None:
            return {"fused": True}
        logger.warning("optim.name=adamw: fused AdamW does not work on this NPU (%s); using foreach", failure)
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
