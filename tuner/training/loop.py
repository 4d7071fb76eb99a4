"""The one training loop shared by every recipe.

A recipe hands over a `TrainingJob` (model, loss, data, optimizer, schedule) and `LoopSettings`;
`run_training` does the rest with Accelerate: devices, processes, mixed precision, gradient
accumulation and state saving. Everything else is a small function below the loop.

Resuming is exact: a run resumed from a checkpoint ends with the same weights as one that was never
interrupted. That holds because the checkpoint restores every RNG (Accelerate's save_state), the
batch order is a pure function of (seed, epoch) and the batches already consumed are skipped, and
nothing outside the training step (data loader start-up, sampling, validation) touches the
training RNG. Recipes keep it exact by drawing data-side randomness (flips, caption dropout) from
the global RNGs in the main process, or from the sample index, never from worker-local state.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import SAFE_MODEL_NAME, DistributedType, send_to_device, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tuner.data.sampling import GroupedBatchSampler
from tuner.distributed import describe_global_batch
from tuner.errors import CheckpointError, DataError, TunerError
from tuner.training.bad_data import DropUnreadable, SkippedLog, SkipUnreadable, UnreadableSample
from tuner.training.checkpoints import (
    checkpoint_name,
    checkpoints_root,
    partial_checkpoints,
    prune_checkpoints,
    publish_checkpoint,
    resolve_resume,
    temporary_checkpoint_dir,
)
from tuner.training.metrics import MetricsLog, peak_memory_mb, plot_losses
from tuner.training.signals import StopRequests, TrainingInterrupted

if TYPE_CHECKING:
    from tuner.config.schema import RunConfig

logger = logging.getLogger(__name__)

LOOP_STATE = "loop_state.json"
EMA_WEIGHTS = "ema.safetensors"


@dataclass
class LoopSettings:
    max_steps: int  # optimizer steps in total
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = no mid-run checkpoints
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0 = only at the end
    validate_every: int = 0  # 0 = only at the end (when validation batches exist)
    ema_decay: float | None = None
    max_nonfinite: int = 5
    seed: int = 42


@dataclass
class TrainingJob:
    model: torch.nn.Module  # recipes wrap several modules in nn.ModuleDict; only LoRA params require grad
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]  # (prepared model, batch) -> scalar mean loss
    dataset: torch.utils.data.Dataset
    batch_sampler: GroupedBatchSampler
    collate_fn: Callable[[list[Any]], Any]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler  # sized in optimizer steps (max_steps)
    # (step, samples_dir), main process only, in eval mode under no_grad, with the training RNG set aside.
    sample_fn: Callable[[int, Path], None] | None = None
    # Already-collated batches; the loss runs under no_grad with the RNG seeded from settings.seed.
    validation_batches: list[Any] | None = None
    num_workers: int = 0
    batch_size_of: Callable[[Any], int] | None = None  # default: length of the batch's first tensor


@dataclass
class LoopResult:
    step: int
    epoch: int
    losses: list[tuple[int, float]]
    validation_losses: list[tuple[int, float]]
    ema_state: dict[str, torch.Tensor] | None  # names as in the unwrapped model's named_parameters()
    stopped_early: bool


@dataclass
class LoopState:
    """Where the run is; saved as loop_state.json in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # per process, as the prepared data loader counts them
    num_processes: int = 1  # batches_in_epoch and the saved RNG states are per process
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)


class NonFiniteLossError(TunerError):
    """Training diverged: the loss or gradient norm stayed NaN/inf for max_nonfinite steps in a row."""

    def __init__(self, message: str, hint: str, result: LoopResult) -> None:
        super().__init__(message, hint)
        self.result = result


def settings_from_config(config: RunConfig, batches_per_epoch: int, num_processes: int = 1) -> LoopSettings:
    """max_steps is train.max_steps, else whole epochs (train.epochs, default 1).

    `batches_per_epoch` is len(batch_sampler). Each process gets 1/num_processes of the batches,
    and Accelerate takes an optimizer step at the end of every epoch even when fewer than
    grad_accum batches are left, so an epoch is ceil(ceil(batches / processes) / grad_accum) steps.
    """
    train = config.train
    if train.max_steps is not None:
        max_steps = train.max_steps
    else:
        batches_per_process = math.ceil(batches_per_epoch / num_processes)
        max_steps = (train.epochs or 1) * math.ceil(batches_per_process / train.grad_accum)
    return LoopSettings(
        max_steps=max_steps,
        grad_accum=train.grad_accum,
        max_grad_norm=config.optim.max_grad_norm,
        log_every=config.output.log_every,
        checkpoint_every=config.output.checkpoint_every,
        keep_checkpoints=config.output.keep_checkpoints,
        sample_every=config.output.sample_every,
        ema_decay=train.ema_decay,
        max_nonfinite=train.max_nonfinite,
        seed=train.seed,
    )


def run_training(
    job: TrainingJob,
    settings: LoopSettings,
    accelerator: Accelerator,
    output_dir: Path,
    resume: str | Path | None = None,
) -> LoopResult:
    output_dir = Path(output_dir)
    main = accelerator.is_main_process
    accelerator.gradient_accumulation_steps = settings.grad_accum
    loader = torch.utils.data.DataLoader(
        SkipUnreadable(job.dataset),
        batch_sampler=_AnySizeBatches(job.batch_sampler),
        collate_fn=DropUnreadable(job.collate_fn),
        num_workers=job.num_workers,
        pin_memory=accelerator.device.type != "cpu",
        persistent_workers=job.num_workers > 0,
        # Without a generator of its own, every new loader iterator draws a seed from the global
        # torch RNG, and a resumed run starts one more iterator than the uninterrupted run did.
        generator=torch.Generator().manual_seed(settings.seed),
    )
    model, optimizer, loader = accelerator.prepare(job.model, job.optimizer, loader)
    if len(loader) == 0:
        raise DataError(
            "the training data gives no batch: every group is smaller than the batch size, with drop_last",
            hint="lower train.batch_size, or add samples",
        )
    # Not handed to prepare(): Accelerate 1.15 steps a prepared schedule num_processes times per
    # optimizer step (it assumes schedules sized in per-process batches). Ours is sized in optimizer
    # steps, so the loop steps it once per step taken and checkpoints it as a registered object.
    lr_scheduler = job.lr_scheduler
    accelerator.register_for_checkpointing(lr_scheduler)
    hooks = _checkpoint_trainable_weights_only(accelerator)

    checkpoint = resolve_resume(output_dir, resume) if resume is not None else None
    if checkpoint is None:
        # Dropout and noise draws start from the run's seed, whatever building the model consumed.
        set_seed(settings.seed, device_specific=True)
        state = LoopState(num_processes=accelerator.num_processes)
    else:
        state = _load_checkpoint(accelerator, checkpoint)  # restores the RNGs as they were at that step
    accelerator.print(
        describe_global_batch(
            job.batch_sampler.batch_size,
            accelerator.num_processes,
            settings.grad_accum,
            job.optimizer.param_groups[0]["lr"],
        )
    )
    unwrapped = accelerator.unwrap_model(model)
    ema = _ema_from(
        unwrapped, settings.ema_decay, checkpoint / EMA_WEIGHTS if checkpoint is not None else None
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if main:
        for leftover in partial_checkpoints(output_dir):
            logger.warning("ignoring %s: an interrupted checkpoint save", leftover)
    metrics = MetricsLog(output_dir) if main else None
    progress = tqdm(
        total=settings.max_steps, initial=state.step, disable=not main, desc="training", unit="step"
    )

    batches = _batches_from(loader, job.batch_sampler, accelerator, state)
    window = _LogWindow(accelerator.device)
    skipped_log = SkippedLog(output_dir)
    nonfinite_in_a_row = 0
    stop_signal = None
    saved_at = state.step if checkpoint is not None else None  # the step of the newest checkpoint
    last_finite_step = state.step
    try:
        with StopRequests() as stop_requests:
            while state.step < settings.max_steps and nonfinite_in_a_row < settings.max_nonfinite:
                step_loss, micro_steps = torch.zeros((), device=accelerator.device), 0
                while True:
                    batch, unreadable = next(batches)
                    _log_unreadable(skipped_log, unreadable, state.step)
                    with accelerator.accumulate(model):
                        if batch is not None:
                            loss = job.loss_fn(model, batch)
                            accelerator.backward(loss)
                    if batch is not None:
                        step_loss += loss.detach().float()
                        micro_steps += 1
                        window.samples += (job.batch_size_of or _count_samples)(batch)
                    if accelerator.sync_gradients:
                        break
                step_loss /= max(micro_steps, 1)
                if 0 < micro_steps < settings.grad_accum:
                    # An epoch's last accumulation can be shorter (or lose batches whose files all
                    # became unreadable); Accelerate 1.15 still divides each loss by grad_accum,
                    # which would give those batches less weight than all the others.
                    for param in trainable:
                        if param.grad is not None:
                            param.grad.mul_(settings.grad_accum / micro_steps)
                grad_norm = accelerator.clip_grad_norm_(trainable, settings.max_grad_norm or math.inf)
                # The one host sync per optimizer step: a skipped step must be decided before it is taken.
                loss_finite, norm_finite = _all_finite(accelerator, step_loss, grad_norm)
                # Under fp16 the GradScaler skips steps with inf gradients itself and lowers its scale.
                diverging = not loss_finite or (not norm_finite and accelerator.scaler is None)
                took_step = not diverging and micro_steps > 0
                if took_step:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                progress.update(1)
                if took_step and not optimizer.step_was_skipped:
                    lr_scheduler.step()
                    _update_ema(ema, unwrapped, settings.ema_decay)
                    window.add(step_loss)
                nonfinite_in_a_row = nonfinite_in_a_row + 1 if diverging else 0
                last_finite_step = state.step if not diverging else last_finite_step

                if state.step % settings.log_every == 0 or state.step == settings.max_steps:
                    mean_loss, samples_per_s = window.flush(accelerator)
                    if mean_loss is not None:
                        state.losses.append((state.step, mean_loss))
                    if main:
                        lr = lr_scheduler.get_last_lr()[0]
                        metrics.write(
                            {
                                "step": state.step,
                                "epoch": round(state.epoch + state.batches_in_epoch / len(loader), 3),
                                "loss": mean_loss,  # None when every step since the last record was skipped
                                "lr": lr,
                                "samples_per_s": samples_per_s,
                                "peak_memory_mb": peak_memory_mb(accelerator.device),
                            }
                        )
                        progress.set_postfix(
                            loss=f"{mean_loss:.4g}" if mean_loss is not None else "-", lr=f"{lr:.3g}"
                        )
                validate_now = settings.validate_every and state.step % settings.validate_every == 0
                if job.validation_batches and validate_now:
                    _validate(job, model, accelerator, settings.seed, state, metrics)
                if job.sample_fn and settings.sample_every and state.step % settings.sample_every == 0:
                    _sample(job.sample_fn, model, accelerator, state.step, output_dir)
                checkpoint_now = settings.checkpoint_every and state.step % settings.checkpoint_every == 0
                if checkpoint_now and not diverging:
                    _save_checkpoint(accelerator, output_dir, state, ema, settings.keep_checkpoints)
                    saved_at = state.step
                stop_signal = _agreed_stop(accelerator, stop_requests.requested)
                if stop_signal is not None:
                    break
            stopped_early = nonfinite_in_a_row >= settings.max_nonfinite
            # Non-finite steps change no weight, so after a divergence these are still the weights
            # of the last finite step (unless a finite step itself produced NaNs): a checkpoint is
            # written only when none holds them yet.
            diverged_unsaved = (
                stopped_early
                and (saved_at is None or saved_at < last_finite_step)
                and _all_parameters_finite(accelerator, trainable)
            )
            if (stop_signal is not None and saved_at != state.step) or diverged_unsaved:
                _save_checkpoint(accelerator, output_dir, state, ema, settings.keep_checkpoints)
                saved_at = state.step
        if stop_signal is not None:
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(stop_signal).name} after step {state.step} of "
                f"{settings.max_steps}; checkpoint saved in {checkpoints_root(output_dir)}",
                hint="continue with the same command plus --resume latest",
                signal_number=stop_signal,
            )

        if not stopped_early:
            if job.validation_batches and not (
                state.validation_losses and state.validation_losses[-1][0] == state.step
            ):
                _validate(job, model, accelerator, settings.seed, state, metrics)
            if job.sample_fn and not (settings.sample_every and state.step % settings.sample_every == 0):
                _sample(job.sample_fn, model, accelerator, state.step, output_dir)
        if main:
            plot_losses(state.losses, state.validation_losses, output_dir / "loss.png")
    finally:
        progress.close()
        if main:
            metrics.close()
        for hook in hooks:
            hook.remove()
    result = LoopResult(state.step, state.epoch, state.losses, state.validation_losses, ema, stopped_early)
    if stopped_early:
        where = (
            f"the checkpoint {checkpoints_root(output_dir) / checkpoint_name(saved_at)} holds the weights "
            "from before the divergence"
            if saved_at is not None
            else "no checkpoint was written before it"
        )
        raise NonFiniteLossError(
            f"training stopped at step {state.step}: the loss or gradient norm was NaN/inf for "
            f"{settings.max_nonfinite} optimizer steps in a row; {where}. Likely causes: the SDXL VAE "
            "running in fp16 (it overflows), a learning rate too high, or fp16 mixed precision on a "
            "model trained in bf16",
            hint="lower optim.lr, use a fp16-safe VAE (model.vae) or runtime.mixed_precision=bf16/no, "
            "and train again; --max-nonfinite sets how many non-finite steps in a row stop a run",
            result=result,
        )
    return result


class _AnySizeBatches(torch.utils.data.Sampler[list[int]]):
    """The grouped batches as Accelerate must shard them across processes.

    Accelerate 1.15's BatchSamplerShard takes a batch shorter than the sampler's `batch_size` for
    the end of the data and drops it, losing the partial batch of every group but the last. With
    batch_size None it deals whole batches of any size to the processes in turn (and, so that all
    processes take the same number of steps, repeats the first batches to fill the last round).
    """

    batch_size = None
    drop_last = False  # the grouped sampler has already dropped what it should

    def __init__(self, batches: GroupedBatchSampler) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _LogWindow:
    """What happened since the last log record. The loss is summed on the device, so the host only
    waits for it once per record."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.steps = 0
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, step_loss: torch.Tensor) -> None:
        self.loss += step_loss
        self.steps += 1

    def flush(self, accelerator: Accelerator) -> tuple[float | None, float]:
        """(mean loss over the steps taken and all processes, samples/s over all processes); resets."""
        total = accelerator.reduce(self.loss, "mean").item()
        mean_loss = total / self.steps if self.steps else None
        samples_per_s = self.samples * accelerator.num_processes / (time.perf_counter() - self.start)
        self.loss.zero_()
        self.steps, self.samples, self.start = 0, 0, time.perf_counter()
        return mean_loss, samples_per_s


def _batches_from(
    loader: torch.utils.data.DataLoader,
    sampler: GroupedBatchSampler,
    accelerator: Accelerator,
    state: LoopState,
) -> Iterator[Any]:
    """Batches epoch after epoch, from where `state` says, keeping state.epoch/batches_in_epoch current."""
    while True:
        if state.batches_in_epoch >= len(loader):  # a checkpoint taken right after an epoch's last batch
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        # Set on the sampler itself: the loader does not pass set_epoch through the wrappers that
        # sharding and skip_first_batches put around it.
        sampler.set_epoch(state.epoch)
        loader.set_epoch(state.epoch)
        epoch = (
            accelerator.skip_first_batches(loader, state.batches_in_epoch)
            if state.batches_in_epoch
            else loader
        )
        for batch in epoch:
            state.batches_in_epoch += 1
            yield batch
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0


def _all_finite(accelerator: Accelerator, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> list[bool]:
    """(loss finite, grad norm finite), agreed by all processes so they skip the same steps."""
    if grad_norm is None:  # DeepSpeed clips inside its engine and may not report a norm
        grad_norm = torch.zeros((), device=loss.device)
    finite = torch.stack([loss.isfinite(), grad_norm.detach().to(loss.device).isfinite()]).float()
    return (accelerator.reduce(finite, "sum") == accelerator.num_processes).tolist()


def _log_unreadable(log: SkippedLog, unreadable: list[UnreadableSample], step: int) -> None:
    for sample in unreadable:
        logger.warning("skipping sample %d: %s", sample.index, sample.why)
        log.write({"when": "training", "step": step, "index": sample.index, "why": sample.why})


def _agreed_stop(accelerator: Accelerator, requested: signal.Signals | None) -> int | None:
    """The stop signal any process received (all processes stop at the same step), or None."""
    if accelerator.num_processes == 1:
        return int(requested) if requested is not None else None
    flag = torch.tensor([int(requested or 0)], device=accelerator.device)
    agreed = int(accelerator.gather(flag).max().item())
    return agreed or None


def _all_parameters_finite(accelerator: Accelerator, parameters: list[torch.nn.Parameter]) -> bool:
    finite = torch.stack([p.detach().isfinite().all() for p in parameters]).all().float()
    return bool(accelerator.reduce(finite, "sum").item() == accelerator.num_processes)


def _count_samples(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = (
        batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, list | tuple) else ()
    )
    for value in values:
        if isinstance(value, torch.Tensor | Mapping | list | tuple):
            return _count_samples(value)
    raise TypeError(
        f"cannot count the samples in a {type(batch).__name__} batch; set TrainingJob.batch_size_of"
    )


def _ema_from(
    model: torch.nn.Module, decay: float | None, resume_from: Path | None
) -> dict[str, torch.Tensor] | None:
    """fp32 copies of the trainable parameters on their device, or the EMA saved in a checkpoint."""
    if decay is None:
        return None
    ema = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
    if resume_from is not None and resume_from.exists():
        for name, saved in load_file(resume_from).items():
            ema[name].copy_(saved)
    return ema


def _update_ema(ema: dict[str, torch.Tensor] | None, model: torch.nn.Module, decay: float | None) -> None:
    if ema is None:
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in ema:
                ema[name].lerp_(param.detach().float(), 1.0 - decay)


@contextmanager
def _evaluating(model: torch.nn.Module, device: torch.device):
    """Eval mode and no_grad, then every submodule back in the mode it was in; the training RNG is
    set aside, so sampling and validation never change what training draws."""
    modes = {module: module.training for module in model.modules()}
    devices = [] if device.type == "cpu" else [device]
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type), torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def _validate(
    job: TrainingJob,
    model: torch.nn.Module,
    accelerator: Accelerator,
    seed: int,
    state: LoopState,
    metrics: MetricsLog | None,
) -> None:
    # Every process runs the same batches: a DDP forward may broadcast buffers, a collective.
    with _evaluating(model, accelerator.device):
        torch.manual_seed(seed)  # the same noise and timesteps every time, so losses compare
        losses = [
            job.loss_fn(model, send_to_device(batch, accelerator.device)).float()
            for batch in job.validation_batches
        ]
    validation_loss = torch.stack(losses).mean().item()
    state.validation_losses.append((state.step, validation_loss))
    if metrics is not None:
        metrics.write({"step": state.step, "epoch": state.epoch, "validation_loss": validation_loss})


def _sample(
    sample_fn: Callable[[int, Path], None],
    model: torch.nn.Module,
    accelerator: Accelerator,
    step: int,
    output_dir: Path,
) -> None:
    if accelerator.is_main_process:
        samples_dir = output_dir / "samples"
        samples_dir.mkdir(parents=True, exist_ok=True)
        with _evaluating(model, accelerator.device):
            sample_fn(step, samples_dir)
    accelerator.wait_for_everyone()


def _checkpoint_trainable_weights_only(accelerator: Accelerator) -> list:
    """Make save_state/load_state keep only the parameters that train (the LoRA weights).

    The frozen base is reloaded from the model on resume; saving it would cost gigabytes per SDXL
    checkpoint, and safetensors refuses the tied embeddings of some Qwen-VL models.
    """
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        # Accelerate 1.15 hands these to DeepSpeed's / FSDP's own sharded save and load (each process
        # writes its shard), passes the hooks no state dicts, and would not read model.safetensors.
        return []

    def keep_trainable(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        for model, state_dict in zip(models, weights, strict=True):
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            for key in [key for key in state_dict if key not in trainable]:
                del state_dict[key]

    def load_trainable(models: list[torch.nn.Module], input_dir: str) -> None:
        for index, model in enumerate(models):
            weights_file = Path(input_dir) / f"{SAFE_MODEL_NAME}{f'_{index}' if index else ''}.safetensors"
            saved = load_file(weights_file)
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            if set(saved) != trainable:
                raise CheckpointError(
                    f"{weights_file}: its trainable weights do not match this model's "
                    f"({len(set(saved) ^ trainable)} names differ): the checkpoint is from a different run",
                    hint="resume with the same model and LoRA settings, or start a new output folder",
                )
            model.load_state_dict(saved, strict=False)
        # Loaded here; Accelerate would otherwise load each model again, strictly, as a full state dict.
        models.clear()

    return [
        accelerator.register_save_state_pre_hook(keep_trainable),
        accelerator.register_load_state_pre_hook(load_trainable),
    ]


def _save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    state: LoopState,
    ema: dict[str, torch.Tensor] | None,
    keep: int,
) -> None:
    temporary = temporary_checkpoint_dir(output_dir, state.step)
    try:
        if accelerator.is_main_process and temporary.exists():
            shutil.rmtree(temporary)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))  # every process: each writes its own RNG state
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (temporary / LOOP_STATE).write_text(json.dumps(asdict(state)))
            if ema is not None:
                save_file(
                    {name: value.cpu().contiguous() for name, value in ema.items()}, temporary / EMA_WEIGHTS
                )
            publish_checkpoint(temporary, state.step)
    except OSError as error:
        # Older checkpoints are pruned only after a new one is published, so they are all still there.
        shutil.rmtree(temporary, ignore_errors=True)
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        raise CheckpointError(
            f"could not write the checkpoint {temporary}: {error.strerror or error}",
            hint=("free disk space" if full else f"check that {output_dir} is writable")
            + ", then continue with --resume latest (earlier checkpoints are intact)",
        ) from error
    if accelerator.is_main_process:
        for deleted in prune_checkpoints(output_dir, keep):
            logger.info("deleted old checkpoint %s", deleted)
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> LoopState:
    """Model, optimizer, schedule, RNGs (Accelerate) and where the loop was (loop_state.json)."""
    saved = json.loads((checkpoint / LOOP_STATE).read_text())
    saved_processes = saved.get("num_processes", 1)
    if saved_processes != accelerator.num_processes:
        # Each process saved its own RNG state and counted its own batches; another process count
        # would replay a different data order and noise, so the run would not continue exactly.
        raise CheckpointError(
            f"{checkpoint} was saved by a run on {saved_processes} process(es); this run has "
            f"{accelerator.num_processes}",
            hint=f"resume with --num-processes {saved_processes}, or start a new output folder",
        )
    accelerator.load_state(str(checkpoint))
    saved["losses"] = [tuple(pair) for pair in saved["losses"]]
    saved["validation_losses"] = [tuple(pair) for pair in saved["validation_losses"]]
    logger.info("resumed from %s at step %d", checkpoint, saved["step"])
    return LoopState(**saved)
