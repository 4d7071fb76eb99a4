"""The one training loop shared by every recipe.

A recipe hands over a `TrainingJob` (model, loss, data, optimizer, schedule) and `LoopSettings`;
`run_training` does the rest with Accelerate: devices, processes, mixed precision, gradient
accumulation and state saving. Everything else is a small function below the loop.

Resuming is exact: a run resumed from a checkpoint ends with the same weights as one that was never
interrupted. That holds because the checkpoint restores every RNG (Accelerate's save_state), the
batch order is a pure function of (seed, epoch) and the batches already consumed are skipped, and
nothing outside the training step (data loader start-up, sampling, validation) touches the
training RNG. Data-side randomness (flips, caption dropout and shuffles, noise, timesteps) is a pure
function of (seed, epoch, sample index): the loader hands datasets `SampleKey`s, indices that carry
their epoch into the workers, so neither workers, processes nor a resume change what is drawn.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    SAFE_MODEL_NAME,
    DistributedType,
    broadcast_object_list,
    send_to_device,
    set_seed,
)
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tuner.atomic import write_atomically
from tuner.data.sampling import GroupedBatchSampler, SampleKey
from tuner.distributed import describe_global_batch
from tuner.errors import CheckpointError, DataError, TunerError
from tuner.runtime.device import device_rng_state, pin_memory_for, restore_device_rng_state
from tuner.training.bad_data import DropUnreadable, SkippedLog, SkipUnreadable, UnreadableSample
from tuner.training.checkpoints import (
    checkpoint_name,
    checkpoints_root,
    partial_checkpoints,
    prune_checkpoints,
    publish_checkpoint,
    resolve_resume,
    set_aside_later_checkpoints,
    temporary_checkpoint_dir,
)
from tuner.training.metrics import LOSS_PLOT_FILE, SAMPLES_DIR, MetricsLog, peak_memory_mb, plot_losses
from tuner.training.optim import fit_schedule_on_resume
from tuner.training.signals import StopRequests, TrainingInterrupted

if TYPE_CHECKING:
    from tuner.config.schema import RunConfig

logger = logging.getLogger(__name__)

LOOP_STATE = "loop_state.json"
EMA_WEIGHTS = "ema.safetensors"
# Per process: the device RNG states Accelerate's save_state leaves out (Ascend NPU).
DEVICE_RNG_STATE = "device_rng_state_{}.safetensors"

# Parts of one batch's loss, logged beside it as `loss/<name>`: name -> (sum of the part's per-sample
# losses, unweighted; number of those samples), both 0-d tensors (see TrainingJob.loss_parts).
LossParts = dict[str, tuple[torch.Tensor, torch.Tensor]]


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
    eval_every: int = 0  # 0 = at the last step only (when the job has an eval_fn)
    # `eval/<metric>` (highest wins) or `validation_loss` (lowest wins): that checkpoint is kept.
    keep_best: str | None = None
    ema_decay: float | None = None
    max_nonfinite: int = 5
    seed: int = 42
    extend_schedule: bool = False  # on resume: stretch the lr schedule to max_steps (see optim)


@dataclass
class TrainingJob:
    """What a recipe hands the loop.

    `loss_fn(prepared model, batch)` returns the batch's scalar loss (a mean, or a sum with
    `loss_items_of`), or `(loss, parts)` where `parts` (`LossParts`) splits it for logging, e.g. SDXL's
    instance and prior (class image) losses. The loop sums each part's (sum, count) over the step's
    micro-batches, the processes and the log window, and logs `loss/<name>` = sum / count (the mean
    per sample; absent from a record whose window held none of that part) for every name in
    `loss_parts`. The names are declared up front so that every process reduces the same tensor.
    """

    model: torch.nn.Module  # recipes wrap several modules in nn.ModuleDict; only LoRA params require grad
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor | tuple[torch.Tensor, LossParts]]
    dataset: torch.utils.data.Dataset
    batch_sampler: GroupedBatchSampler
    collate_fn: Callable[[list[Any]], Any]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler  # sized in optimizer steps (max_steps)
    # (step, samples_dir), main process only, in eval mode under no_grad, with the training RNG set aside.
    sample_fn: Callable[[int, Path], None] | None = None
    # step -> {metric: score}, called like sample_fn; the loop logs them as `eval/<metric>`. One that
    # fails is reported and training goes on: a failing evaluation never costs the run.
    eval_fn: Callable[[int], dict[str, float]] | None = None
    # Writes the run's outputs (the adapter) from the trained weights and the EMA state (None without
    # EMA), on every process, once the run is done: after the final checkpoint and before the last
    # evaluation, so that neither can be lost to it. None: the recipe saves after run_training.
    save_fn: Callable[[dict[str, torch.Tensor] | None], None] | None = None
    # Already-collated batches; the loss runs under no_grad with the RNG seeded from settings.seed.
    validation_batches: list[Any] | None = None
    num_workers: int = 0
    # `data.pin_memory`: pin batches in host memory; None: the device's default (`pin_memory_for`).
    pin_memory: bool | None = None
    batch_size_of: Callable[[Any], int] | None = None  # default: length of the batch's first tensor
    # Set when loss_fn returns a batch's loss summed over items (Qwen-VL: supervised tokens); this
    # counts a batch's items, and the loop divides by the items of the whole optimizer step, over
    # accumulation and processes. None: loss_fn returns a mean and micro-batches weigh the same.
    loss_items_of: Callable[[Any], int] | None = None
    # The names of the parts loss_fn reports (see the class docstring); () logs the loss alone.
    loss_parts: tuple[str, ...] = ()


@dataclass
class LoopResult:
    step: int
    epoch: int
    losses: list[tuple[int, float]]
    validation_losses: list[tuple[int, float]]
    ema_state: dict[str, torch.Tensor] | None  # names as in the unwrapped model's named_parameters()
    stopped_early: bool
    best_checkpoint: Path | None = None  # output.keep_best's checkpoint


@dataclass
class LoopState:
    """Where the run is; saved as loop_state.json in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # per process, as the prepared data loader counts them
    num_processes: int = 1  # batches_in_epoch and the saved RNG states are per process
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    # TrainingJob.loss_parts' means by name, as (step, mean) like `losses`, for the loss plot.
    part_losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    best: tuple[int, float] | None = None  # (step, value) of output.keep_best's best so far


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
        validate_every=config.output.validate_every,
        eval_every=config.output.eval_every,
        keep_best=config.output.keep_best,
        ema_decay=train.ema_decay,
        max_nonfinite=train.max_nonfinite,
        seed=train.seed,
        extend_schedule=train.extend_schedule,
    )


def run_training(
    job: TrainingJob,
    settings: LoopSettings,
    accelerator: Accelerator,
    output_dir: Path,
    resume: str | Path | None = None,
) -> LoopResult:
    """Train until settings.max_steps (or a stop signal, or a divergence), then validate and sample."""
    run = _start_run(job, settings, accelerator, Path(output_dir), resume)
    first_step, stop_signal = run.state.step, None
    try:
        with StopRequests() as stop_requests:
            while run.state.step < settings.max_steps and not run.diverged:
                _train_step(run, check_train_mode=run.state.step == first_step)
                _after_step(run)
                stop_signal = _agreed_stop(accelerator, stop_requests.requested)
                if stop_signal is not None:
                    break
            _save_final_checkpoint(run)
        if stop_signal is not None:
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(stop_signal).name} after step {run.state.step} of "
                f"{settings.max_steps}; checkpoint saved in {checkpoints_root(run.output_dir)}",
                hint="continue with the same command plus --resume latest",
                signal_number=stop_signal,
            )
        if not run.diverged:
            if job.save_fn is not None:
                job.save_fn(run.ema)
            if run.state.step > first_step:
                _evaluate_last_step(run)
        _finish(run)
    finally:
        _close(run)
    return _result(run)


@dataclass
class _Run:
    """One run in progress: the prepared pieces, and what the steps so far have left behind."""

    job: TrainingJob
    settings: LoopSettings
    accelerator: Accelerator
    output_dir: Path
    model: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    batches_per_epoch: int
    batches: Iterator[tuple[Any, list[UnreadableSample], bool]]
    state: LoopState
    ema: dict[str, torch.Tensor] | None
    metrics: MetricsLog | None  # main process only
    progress: tqdm
    hooks: list
    window: _LogWindow
    skipped_log: SkippedLog
    saved_at: int | None  # the step of the newest checkpoint
    last_finite_step: int
    nonfinite_in_a_row: int = 0
    last_step_diverged: bool = False

    @property
    def diverged(self) -> bool:
        return self.nonfinite_in_a_row >= self.settings.max_nonfinite


def _start_run(
    job: TrainingJob,
    settings: LoopSettings,
    accelerator: Accelerator,
    output_dir: Path,
    resume: str | Path | None,
) -> _Run:
    """Prepare model, optimizer and data with Accelerate, then start fresh or from a checkpoint."""
    accelerator.gradient_accumulation_steps = settings.grad_accum
    model, optimizer, loader = accelerator.prepare(
        job.model, job.optimizer, _data_loader(job, settings, accelerator)
    )
    if len(loader) == 0:
        raise DataError(
            "the training data gives no batch: every group is smaller than the batch size, with drop_last",
            hint="lower train.batch_size, or add samples",
        )
    # Not handed to prepare(): Accelerate 1.15 steps a prepared schedule num_processes times per
    # optimizer step (it assumes schedules sized in per-process batches). Ours is sized in optimizer
    # steps, so the loop steps it once per step taken and checkpoints it as a registered object.
    accelerator.register_for_checkpointing(job.lr_scheduler)
    hooks = _checkpoint_trainable_weights_only(accelerator)
    _train_mode(model)

    checkpoint = resolve_resume(output_dir, resume) if resume is not None else None
    state = _start_or_resume(accelerator, settings, output_dir, checkpoint, job.lr_scheduler)
    accelerator.print(
        describe_global_batch(
            job.batch_sampler.batch_size,
            accelerator.num_processes,
            settings.grad_accum,
            job.optimizer.param_groups[0]["lr"],
        )
    )
    ema = _ema_from(
        accelerator.unwrap_model(model),
        settings.ema_decay,
        checkpoint / EMA_WEIGHTS if checkpoint is not None else None,
    )
    main = accelerator.is_main_process
    if main:
        for leftover in partial_checkpoints(output_dir):
            logger.warning("ignoring %s: an interrupted checkpoint save", leftover)
    return _Run(
        job=job,
        settings=settings,
        accelerator=accelerator,
        output_dir=output_dir,
        model=model,
        trainable=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        batches_per_epoch=len(loader),
        batches=_batches_from(loader, job.batch_sampler, accelerator, state),
        state=state,
        ema=ema,
        # The recipe started the run's trackers (`--log-with`); Accelerate keeps them on the main process.
        metrics=MetricsLog(output_dir, accelerator.trackers) if main else None,
        progress=tqdm(
            total=settings.max_steps, initial=state.step, disable=not main, desc="training", unit="step"
        ),
        hooks=hooks,
        window=_LogWindow(accelerator.device, job.loss_parts),
        skipped_log=SkippedLog(output_dir),
        saved_at=state.step if checkpoint is not None else None,
        last_finite_step=state.step,
    )


def _train_step(run: _Run, check_train_mode: bool) -> None:
    """One optimizer step: accumulate the step's micro-batches, clip, and step unless it diverged."""
    job, accelerator, optimizer = run.job, run.accelerator, run.optimizer
    micro_batches = _next_micro_batches(run.batches, run.settings.grad_accum, run.skipped_log, run.state.step)
    if check_train_mode:
        _require_train_mode(run.model)
    step_loss, step_parts, micro_steps = _accumulate_gradients(job, run.model, accelerator, micro_batches)
    run.window.samples += sum((job.batch_size_of or _count_samples)(b) for b in micro_batches if b)
    grad_norm = accelerator.clip_grad_norm_(run.trainable, run.settings.max_grad_norm or math.inf)
    # The one host sync per optimizer step: a skipped step must be decided before it is taken.
    loss_finite, norm_finite = _all_finite(accelerator, step_loss, grad_norm)
    # Under fp16 the GradScaler skips steps with inf gradients itself and lowers its scale.
    diverging = not loss_finite or (not norm_finite and accelerator.scaler is None)
    took_step = not diverging and micro_steps > 0
    if took_step:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    run.progress.update(1)
    if took_step and not optimizer.step_was_skipped:
        job.lr_scheduler.step()
        _update_ema(run.ema, accelerator.unwrap_model(run.model), run.settings.ema_decay)
        run.window.add(step_loss, step_parts)
    run.last_step_diverged = diverging
    run.nonfinite_in_a_row = run.nonfinite_in_a_row + 1 if diverging else 0
    if not diverging:
        run.last_finite_step = run.state.step


def _after_step(run: _Run) -> None:
    """Log, validate / evaluate / sample, and checkpoint, each when its schedule says."""
    settings, state = run.settings, run.state
    if state.step % settings.log_every == 0 or state.step == settings.max_steps:
        lr = run.job.lr_scheduler.get_last_lr()[0]
        _log_step(run.window, run.accelerator, state, run.batches_per_epoch, lr, run.metrics, run.progress)
    new_best = _evaluate_on_schedule(
        run.job, run.model, run.accelerator, settings, state, run.metrics, run.output_dir
    )
    checkpoint_now = new_best or (settings.checkpoint_every and state.step % settings.checkpoint_every == 0)
    if checkpoint_now and not run.last_step_diverged:
        _save_run_checkpoint(run)


def _save_run_checkpoint(run: _Run) -> None:
    _save_checkpoint(run.accelerator, run.output_dir, run.state, run.ema, run.settings.keep_checkpoints)
    run.saved_at = run.state.step
    if run.metrics is not None:
        run.metrics.refresh_report()


def _save_final_checkpoint(run: _Run) -> None:
    """Every run that did not diverge ends with a checkpoint (a finished one too, so that --resume
    latest with a higher max_steps trains it further, also with checkpoint_every 0). After a
    divergence, non-finite steps changed no weight, so the weights are still those of the last finite
    step (unless a finite step itself produced NaNs): they are saved only when no checkpoint holds
    them yet."""
    if not run.diverged:
        if run.saved_at != run.state.step:
            _save_run_checkpoint(run)
    elif (run.saved_at is None or run.saved_at < run.last_finite_step) and _all_parameters_finite(
        run.accelerator, run.trainable
    ):
        _save_run_checkpoint(run)


def _finish(run: _Run) -> None:
    """After the last step: validation and samples unless the last step already made them, the plot."""
    job, settings, state = run.job, run.settings, run.state
    if not run.diverged:
        if job.validation_batches and not (
            state.validation_losses and state.validation_losses[-1][0] == state.step
        ):
            _validate(job, run.model, run.accelerator, settings.seed, state, run.metrics)
        if job.sample_fn and not (settings.sample_every and state.step % settings.sample_every == 0):
            _sample(job.sample_fn, run.model, run.accelerator, state.step, run.output_dir)
    if run.metrics is not None:
        plot_losses(state.losses, state.validation_losses, run.output_dir / LOSS_PLOT_FILE, state.part_losses)
        run.metrics.refresh_report()


def _close(run: _Run) -> None:
    run.progress.close()
    if run.metrics is not None:
        run.metrics.close()
    for hook in run.hooks:
        hook.remove()


def _result(run: _Run) -> LoopResult:
    """What the run ended with; a divergence raises NonFiniteLossError carrying it."""
    state, output_dir = run.state, run.output_dir
    result = LoopResult(state.step, state.epoch, state.losses, state.validation_losses, run.ema, run.diverged)
    if state.best is not None:
        best = checkpoints_root(output_dir) / checkpoint_name(state.best[0])
        result.best_checkpoint = best if best.is_dir() else None
        run.accelerator.print(
            f"best checkpoint ({run.settings.keep_best}={state.best[1]:.4g}, step {state.best[0]}): {best}"
        )
    if run.diverged:
        where = (
            f"the checkpoint {checkpoints_root(output_dir) / checkpoint_name(run.saved_at)} holds the "
            "weights from before the divergence"
            if run.saved_at is not None
            else "no checkpoint was written before it"
        )
        raise NonFiniteLossError(
            f"training stopped at step {state.step}: the loss or gradient norm was NaN/inf for "
            f"{run.settings.max_nonfinite} optimizer steps in a row; {where}. Likely causes: the SDXL "
            "VAE running in fp16 (it overflows), a learning rate too high, or fp16 mixed precision on a "
            "model trained in bf16",
            hint="lower optim.lr, use a fp16-safe VAE (model.vae) or runtime.mixed_precision=bf16/no, "
            "and train again; --max-nonfinite sets how many non-finite steps in a row stop a run",
            result=result,
        )
    return result


def _data_loader(
    job: TrainingJob, settings: LoopSettings, accelerator: Accelerator
) -> torch.utils.data.DataLoader:
    """The job's batches as `SampleKey`s; unreadable samples dropped from their batch and reported."""
    return torch.utils.data.DataLoader(
        SkipUnreadable(job.dataset),
        batch_sampler=_AnySizeBatches(job.batch_sampler),
        collate_fn=DropUnreadable(job.collate_fn),
        num_workers=job.num_workers,
        pin_memory=pin_memory_for(accelerator.device.type, job.pin_memory),
        persistent_workers=job.num_workers > 0,
        # Without a generator of its own, every new loader iterator draws a seed from the global
        # torch RNG, and a resumed run starts one more iterator than the uninterrupted run did.
        generator=torch.Generator().manual_seed(settings.seed),
    )


def _start_or_resume(
    accelerator: Accelerator,
    settings: LoopSettings,
    output_dir: Path,
    checkpoint: Path | None,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> LoopState:
    """A fresh state with the run's seed, or the checkpoint's state (weights, optimizer, RNGs...)."""
    if checkpoint is None:
        # Dropout and noise draws start from the run's seed, whatever building the model consumed.
        set_seed(settings.seed, device_specific=True)
        return LoopState(num_processes=accelerator.num_processes)
    accelerator.wait_for_everyone()  # every process has resolved the checkpoint before any move
    if accelerator.is_main_process:
        for moved in set_aside_later_checkpoints(output_dir, checkpoint):
            accelerator.print(f"moved {moved.name} aside to {moved.parent}: resuming from an earlier step")
    accelerator.wait_for_everyone()
    state = _load_checkpoint(accelerator, checkpoint)  # restores the RNGs as they were at that step
    schedule_note = fit_schedule_on_resume(lr_scheduler, settings.max_steps, settings.extend_schedule)
    if schedule_note:
        accelerator.print(schedule_note)
    return state


def _log_step(
    window: _LogWindow,
    accelerator: Accelerator,
    state: LoopState,
    batches_per_epoch: int,
    lr: float,
    metrics: MetricsLog | None,
    progress: tqdm,
) -> None:
    """One metrics record (and the progress bar's loss) for the steps since the last record."""
    mean_loss, part_means, samples_per_s = window.flush(accelerator)
    if mean_loss is not None:
        state.losses.append((state.step, mean_loss))
    for name, mean in part_means.items():
        state.part_losses.setdefault(name, []).append((state.step, mean))
    if metrics is None:
        return
    metrics.write(
        {
            "step": state.step,
            "epoch": round(state.epoch + state.batches_in_epoch / batches_per_epoch, 3),
            "loss": mean_loss,  # None when every step since the last record was skipped
            **{f"loss/{name}": mean for name, mean in part_means.items()},
            "lr": lr,
            "samples_per_s": samples_per_s,
            "peak_memory_mb": peak_memory_mb(accelerator.device),
        }
    )
    progress.set_postfix(loss=f"{mean_loss:.4g}" if mean_loss is not None else "-", lr=f"{lr:.3g}")


def _evaluate_on_schedule(
    job: TrainingJob,
    model: torch.nn.Module,
    accelerator: Accelerator,
    settings: LoopSettings,
    state: LoopState,
    metrics: MetricsLog | None,
    output_dir: Path,
) -> bool:
    """Validation every validate_every steps, evaluation every eval_every steps and at the last step,
    and samples every sample_every steps (0: at the end). True when output.keep_best improved."""
    new_best = False
    if job.validation_batches and settings.validate_every and state.step % settings.validate_every == 0:
        _validate(job, model, accelerator, settings.seed, state, metrics)
        new_best = _note_best(settings.keep_best, state, "validation_loss", state.validation_losses[-1][1])
    every = settings.eval_every
    # The last step is evaluated once its checkpoint and outputs are written (`_evaluate_last_step`).
    if job.eval_fn and every and state.step % every == 0 and state.step != settings.max_steps:
        scores = _evaluate(job.eval_fn, model, accelerator, state, metrics)
        for name, value in scores.items():
            new_best = _note_best(settings.keep_best, state, f"eval/{name}", value) or new_best
    if job.sample_fn and settings.sample_every and state.step % settings.sample_every == 0:
        _sample(job.sample_fn, model, accelerator, state.step, output_dir)
    return new_best


def _evaluate_last_step(run: _Run) -> None:
    """Evaluate the last step after its checkpoint and the run's outputs are written. A new best makes
    that final checkpoint the best one: its loop state records it, and the older best may be pruned."""
    job, settings, state = run.job, run.settings, run.state
    if job.eval_fn is None:
        return
    scores = _evaluate(job.eval_fn, run.model, run.accelerator, state, run.metrics)
    improved = [
        _note_best(settings.keep_best, state, f"eval/{name}", value) for name, value in scores.items()
    ]
    if any(improved) and run.saved_at == state.step and run.accelerator.is_main_process:
        checkpoint = checkpoints_root(run.output_dir) / checkpoint_name(state.step)
        write_atomically(checkpoint / LOOP_STATE, lambda path: path.write_text(json.dumps(asdict(state))))
        for deleted in prune_checkpoints(run.output_dir, settings.keep_checkpoints, also_keep=state.step):
            logger.info("deleted old checkpoint %s", deleted)


def _evaluate(
    eval_fn: Callable[[int], dict[str, float]],
    model: torch.nn.Module,
    accelerator: Accelerator,
    state: LoopState,
    metrics: MetricsLog | None,
) -> dict[str, float]:
    """The scores of `eval_fn` (on the main process, like sampling), shared with every process so that
    all agree on whether to save a best checkpoint, and logged as `eval/<metric>`. An evaluation that
    fails is reported and scores nothing: training, checkpoints and outputs go on without it."""
    scores = None
    if accelerator.is_main_process:
        with _evaluating(model, accelerator.device):
            try:
                scores = eval_fn(state.step)
            except Exception as error:  # any failure, a bug included: it must not cost the run
                _report_failed_evaluation(state.step, error)
    if accelerator.num_processes > 1:
        scores = broadcast_object_list([scores])[0]
    if scores is None:
        return {}
    if metrics is not None:
        metrics.write(
            {"step": state.step, "epoch": state.epoch, **{f"eval/{k}": v for k, v in scores.items()}}
        )
    return scores


def _report_failed_evaluation(step: int, error: Exception) -> None:
    """One warning for a user's error (with its hint); a bug also keeps its traceback."""
    print(
        f"warning: the evaluation at step {step} failed and scored nothing; training and its checkpoints "
        f"and outputs go on: {type(error).__name__}: {error}",
        file=sys.stderr,
    )
    if not isinstance(error, TunerError):
        traceback.print_exception(error, file=sys.stderr)


def _note_best(keep_best: str | None, state: LoopState, name: str, value: float) -> bool:
    """Record `value` as the best so far when `name` is the keep_best metric and it improved on it."""
    if name != keep_best or not math.isfinite(value):
        return False
    lower_is_better = name == "validation_loss"
    if state.best is not None and (value >= state.best[1] if lower_is_better else value <= state.best[1]):
        return False
    state.best = (state.step, value)
    return True


class _AnySizeBatches(torch.utils.data.Sampler[list[SampleKey]]):
    """The grouped batches as Accelerate must shard them across processes, each index a `SampleKey`
    that carries the epoch into the data-loader workers (see `tuner.data.sampling.SampleKey`).

    Accelerate 1.15's BatchSamplerShard takes a batch shorter than the sampler's `batch_size` for
    the end of the data and drops it, losing the partial batch of every group but the last. With
    batch_size None it deals whole batches of any size to the processes in turn (and, so that all
    processes take the same number of steps, repeats the first batches to fill the last round).
    """

    batch_size = None
    drop_last = False  # the grouped sampler has already dropped what it should

    def __init__(self, batches: GroupedBatchSampler) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[SampleKey]]:
        return self.batches.keyed()

    def __len__(self) -> int:
        return len(self.batches)


class _LogWindow:
    """What happened since the last log record. The loss and its parts are summed on the device, so
    the host only waits for them once per record."""

    def __init__(self, device: torch.device, part_names: tuple[str, ...] = ()) -> None:
        self.loss = torch.zeros((), device=device)
        self.part_names = part_names
        self.parts = torch.zeros((len(part_names), 2), device=device)  # per part: (sum, count)
        self.steps = 0
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, step_loss: torch.Tensor, step_parts: torch.Tensor) -> None:
        self.loss += step_loss
        self.parts += step_parts
        self.steps += 1

    def flush(self, accelerator: Accelerator) -> tuple[float | None, dict[str, float], float]:
        """(mean loss over the steps taken and all processes, each part's mean per sample over them
        (parts without samples left out), samples/s over all processes); resets."""
        total = accelerator.reduce(self.loss, "mean").item()
        mean_loss = total / self.steps if self.steps else None
        part_means = {}
        if self.part_names:
            totals = accelerator.reduce(self.parts, "sum").tolist()
            part_means = {
                name: total / count
                for name, (total, count) in zip(self.part_names, totals, strict=True)
                if count > 0
            }
        samples_per_s = self.samples * accelerator.num_processes / (time.perf_counter() - self.start)
        self.loss.zero_()
        self.parts.zero_()
        self.steps, self.samples, self.start = 0, 0, time.perf_counter()
        return mean_loss, part_means, samples_per_s


def _batches_from(
    loader: torch.utils.data.DataLoader,
    sampler: GroupedBatchSampler,
    accelerator: Accelerator,
    state: LoopState,
) -> Iterator[Any]:
    """(batch or None, unreadable samples, last of its epoch) epoch after epoch, from where `state` says,
    keeping state.epoch/batches_in_epoch current."""
    while True:
        if state.batches_in_epoch >= len(loader):  # a checkpoint taken right after an epoch's last batch
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        # Set on the sampler itself, in this process: the loader does not pass set_epoch through the
        # wrappers that sharding and skip_first_batches put around it. The epoch reaches the datasets
        # in the workers only inside each SampleKey (a dataset attribute set here would not).
        sampler.set_epoch(state.epoch)
        loader.set_epoch(state.epoch)
        epoch = (
            accelerator.skip_first_batches(loader, state.batches_in_epoch)
            if state.batches_in_epoch
            else loader
        )
        for batch, unreadable in epoch:
            state.batches_in_epoch += 1
            yield batch, unreadable, state.batches_in_epoch == len(loader)
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0


def _next_micro_batches(
    batches: Iterator[tuple[Any, list[UnreadableSample], bool]], grad_accum: int, log: SkippedLog, step: int
) -> list[Any]:
    """The micro-batches of the next optimizer step: grad_accum of them, fewer at an epoch's end.

    Fetched before the step's first forward, so that a loss summed over items (tokens) can be divided
    by the items of the whole step. An entry is None where every sample of the batch was unreadable.
    """
    micro_batches = []
    while True:
        batch, unreadable, last_in_epoch = next(batches)
        _log_unreadable(log, unreadable, step)
        micro_batches.append(batch)
        if len(micro_batches) == grad_accum or last_in_epoch:
            return micro_batches


def _accumulate_gradients(
    job: TrainingJob, model: torch.nn.Module, accelerator: Accelerator, micro_batches: list[Any]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward over one optimizer step's micro-batches; (the step's loss, its parts' summed
    (sum, count) rows in `job.loss_parts` order, batches run).

    The loop owns the accumulation (Accelerate's `no_sync` and `sync_gradients`, not its step
    counter), so each micro-batch's weight is exact also in a window shorter than grad_accum. Each
    micro-batch's loss is weighted so that the step's gradient is the gradient of:
      * a mean loss (`loss_items_of` None): the mean over the micro-batches;
      * a summed loss: the sum over every item (supervised token) of the step, on all processes,
        divided by their number, as the transformers Trainer does with `num_items_in_batch`. A
        micro-batch of 5 tokens then weighs each token as much as one of 500.
    """
    readable = [batch for batch in micro_batches if batch is not None]
    if accelerator.num_processes > 1:
        # A process whose batches were all unreadable has no backward to run; the others' DDP
        # all-reduce would wait for it forever, so then every process skips the step.
        count = torch.tensor([float(len(readable))], device=accelerator.device)
        if accelerator.gather(count).min().item() == 0:
            readable = []
    if job.loss_items_of is None:
        weight = torch.tensor(1.0 / max(len(readable), 1), device=accelerator.device)
    else:
        items = torch.tensor(
            float(sum(job.loss_items_of(batch) for batch in readable)), device=accelerator.device
        )
        items = accelerator.reduce(items, "sum") if accelerator.num_processes > 1 else items
        # DDP averages the processes' gradients: times num_processes turns that into their sum.
        weight = accelerator.num_processes / items.clamp(min=1.0)
    step_loss = torch.zeros((), device=accelerator.device)
    step_parts = torch.zeros((len(job.loss_parts), 2), device=accelerator.device)
    for index, batch in enumerate(readable):
        last = index == len(readable) - 1
        accelerator.sync_gradients = last  # DeepSpeed steps its engine on the synchronising backward
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss, parts = _loss_and_parts(job.loss_fn(model, batch))
            loss = loss * weight
            # Accelerate divides every loss by its gradient_accumulation_steps; the weight says it all.
            accelerator.backward(loss * accelerator.gradient_accumulation_steps)
        step_loss += loss.detach().float()
        step_parts += _parts_tensor(parts, job.loss_parts, accelerator.device)
    accelerator.sync_gradients = True
    return step_loss, step_parts, len(readable)


def _loss_and_parts(output: torch.Tensor | tuple[torch.Tensor, LossParts]) -> tuple[torch.Tensor, LossParts]:
    """A loss_fn's output as (loss, parts); a plain loss has no parts."""
    return output if isinstance(output, tuple) else (output, {})


def _parts_tensor(parts: LossParts, names: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """One batch's parts as (sum, count) rows in the order of `names`; a part it lacks is a row of zeros."""
    unknown = set(parts) - set(names)
    if unknown:
        raise ValueError(
            f"loss_fn reported the parts {sorted(unknown)}, not in TrainingJob.loss_parts {names}"
        )
    rows = [
        torch.stack([parts[name][0].detach().float(), parts[name][1].float()]).to(device)
        if name in parts
        else torch.zeros(2, device=device)
        for name in names
    ]
    return torch.stack(rows) if rows else torch.zeros((0, 2), device=device)


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


def _require_train_mode(model: torch.nn.Module) -> None:
    """The loop's mode rule, checked at the first step: every module trains (see `_train_mode`)."""
    in_eval = [name or type(model).__name__ for name, module in model.named_modules() if not module.training]
    if in_eval:
        raise RuntimeError(
            f"{len(in_eval)} module(s) are in eval mode at the first training step, e.g. {in_eval[:3]}: "
            "something outside the loop changed the modes the loop set"
        )


def _train_mode(model: torch.nn.Module) -> None:
    """Every module in training mode: the loop owns the modes, as torchtune's recipes do.

    `from_pretrained` hands models over in eval mode, and transformers 5.23 checkpoints a layer only
    when it is in training mode, so without this `train.gradient_checkpointing` would do nothing.
    Frozen base modules train too, which also switches on the base model's own dropout, as the
    transformers Trainer and diffusers' training scripts do: the configs of the supported models
    (Qwen-VL attention_dropout, CLIP text encoders, the SDXL UNet and VAE) set it to 0.0, so only
    LoRA dropout (`lora.dropout`) draws anything. None of them has batch norm.
    """
    model.train()


@contextmanager
def _evaluating(model: torch.nn.Module, device: torch.device):
    """Eval mode and no_grad, then training mode again; the training RNG is set aside, so sampling
    and validation never change what training draws."""
    devices = [] if device.type == "cpu" else [device]
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type), torch.no_grad():
            yield
    finally:
        _train_mode(model)


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
            _loss_and_parts(job.loss_fn(model, send_to_device(batch, accelerator.device)))[0].float()
            for batch in job.validation_batches
        ]
    if job.loss_items_of is None:
        validation_loss = torch.stack(losses).mean().item()
    else:  # summed losses: the mean over every item (token) of the validation set
        items = sum(job.loss_items_of(batch) for batch in job.validation_batches)
        validation_loss = torch.stack(losses).sum().item() / max(items, 1)
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
        samples_dir = output_dir / SAMPLES_DIR
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
    failure: OSError | None = None
    try:
        if accelerator.is_main_process and temporary.exists():
            shutil.rmtree(temporary)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))  # every process: each writes its own RNG state
        device_rng = device_rng_state(accelerator.device)
        if device_rng is not None:
            # One uint8 tensor per device, stored with safetensors like every other weight file we read back.
            save_file(
                {str(index): state for index, state in enumerate(device_rng)},
                temporary / DEVICE_RNG_STATE.format(accelerator.process_index),
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (temporary / LOOP_STATE).write_text(json.dumps(asdict(state)))
            if ema is not None:
                save_file(
                    {name: value.cpu().contiguous() for name, value in ema.items()}, temporary / EMA_WEIGHTS
                )
            publish_checkpoint(temporary, state.step)
    except OSError as error:
        failure = error
    # Agreed by every process: a write that failed on the main process alone must stop the others
    # too, instead of leaving them waiting at the next collective.
    if _any_process(accelerator, failure is not None):
        # Older checkpoints are pruned only after a new one is published, so they are all still there.
        shutil.rmtree(temporary, ignore_errors=True)
        full = failure is not None and failure.errno in (errno.ENOSPC, errno.EDQUOT)
        why = (failure.strerror or str(failure)) if failure is not None else "another process failed"
        raise CheckpointError(
            f"could not write the checkpoint {temporary}: {why}",
            hint=("free disk space" if full else f"check that {output_dir} is writable")
            + ", then continue with --resume latest (earlier checkpoints are intact)",
        ) from failure
    if accelerator.is_main_process:
        for deleted in prune_checkpoints(output_dir, keep, also_keep=state.best[0] if state.best else None):
            logger.info("deleted old checkpoint %s", deleted)
    accelerator.wait_for_everyone()


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when `flag` is True on any of them."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item() > 0)


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
    device_rng = checkpoint / DEVICE_RNG_STATE.format(accelerator.process_index)
    if device_rng.exists():
        states = load_file(device_rng)
        restore_device_rng_state(accelerator.device, [states[str(index)] for index in range(len(states))])
    saved["losses"] = [tuple(pair) for pair in saved["losses"]]
    saved["validation_losses"] = [tuple(pair) for pair in saved["validation_losses"]]
    saved["part_losses"] = {
        name: [tuple(pair) for pair in pairs] for name, pairs in saved.get("part_losses", {}).items()
    }
    saved["best"] = tuple(saved["best"]) if saved.get("best") else None
    logger.info("resumed from %s at step %d", checkpoint, saved["step"])
    return LoopState(**saved)
