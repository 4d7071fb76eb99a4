"""Our SDXL trainer against the diffusers example's algorithm, on one model, data set, batch and seed."""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from tuner.bench.measure import PeakMemory, RunFigures, StepClock, TimedLoss, model_flops_utilisation
from tuner.bench.profiling import profiler_for
from tuner.bench.rounds import Trainer
from tuner.bench.sdxl_baseline import train_baseline_sdxl
from tuner.bench.sdxl_shapes import build_sdxl_pipeline, write_captioned_images
from tuner.config.schema import RunConfig

WARMUP_STEPS = 2
FLOPS_STEP = 1  # inside the warm-up: counting slows the step it counts
LORA_RANK = 16
LEARNING_RATE = 1e-4


@dataclass(frozen=True)
class SDXLBenchSettings:
    scale: str
    device: str
    steps: int
    batch_size: int
    resolution: int
    images: int
    seed: int = 0
    compile: bool = False
    channels_last: bool = False
    dora: bool = False  # lora.variant: dora
    profile_dir: Path | None = None  # profile our trainer's steps after warm-up into this folder

    @property
    def mixed_precision(self) -> str:
        return "no" if self.device == "cpu" else "bf16"


def sdxl_trainers(
    settings: SDXLBenchSettings, work_dir: Path, baseline: bool = True, variants: tuple[str, ...] = ()
) -> list[Trainer]:
    """Build (once) the model and images; then the baseline (if asked), our trainer, and our trainer
    with each of `variants` ("channels_last", "compile", "dora") switched on, as trainers to run."""
    model_dir = build_sdxl_pipeline(settings.scale, work_dir / f"sdxl-{settings.scale}")
    data_dir = work_dir / f"images-{settings.resolution}-{settings.images}"
    if not data_dir.exists():
        write_captioned_images(data_dir, settings.images, settings.resolution, settings.seed)
    trainers: list[Trainer] = []
    if baseline:
        trainers.append(
            functools.partial(
                train_baseline_sdxl,
                model_dir,
                data_dir,
                steps=settings.steps,
                batch_size=settings.batch_size,
                resolution=settings.resolution,
                rank=LORA_RANK,
                lr=LEARNING_RATE,
                seed=settings.seed,
                device=torch.device(settings.device),
                weight_dtype=torch.float32 if settings.mixed_precision == "no" else torch.bfloat16,
                warmup=WARMUP_STEPS,
            )
        )
    trainers.append(functools.partial(train_ours_sdxl, settings, model_dir, data_dir))
    for variant in variants:
        changed = dataclasses.replace(settings, **{variant: True})
        trainers.append(functools.partial(train_ours_sdxl, changed, model_dir, data_dir))
    return trainers


def ours_config(settings: SDXLBenchSettings, model_dir: Path, data_dir: Path, output_dir: Path) -> RunConfig:
    """The run config of our recipe for this benchmark: defaults (cached latents and embeddings, AdamW)."""
    return RunConfig.model_validate(
        {
            "task": "sdxl-lora",
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(data_dir), "resolution": settings.resolution, "bucketing": False},
            "lora": {"rank": LORA_RANK, "alpha": LORA_RANK, "variant": "dora" if settings.dora else "lora"},
            "optim": {"lr": LEARNING_RATE},
            "train": {
                "batch_size": settings.batch_size,
                "max_steps": settings.steps,
                "seed": settings.seed,
                "cache_dir": str(output_dir / "cache"),
            },
            "output": {
                "dir": str(output_dir),
                "log_every": settings.steps,
                "sample_prompts": ["a circle"],
                "sample_steps": 1,
            },
            "runtime": {
                "device": settings.device,
                "mixed_precision": settings.mixed_precision,
                "compile": settings.compile,
                "channels_last": settings.channels_last,
            },
        }
    )


def train_ours_sdxl(settings: SDXLBenchSettings, model_dir: Path, data_dir: Path) -> RunFigures:
    """Our recipe end to end (`train_sdxl_lora`) with its loss timed; caching counts to the first step."""
    from tuner.recipes import sdxl as recipe

    device = torch.device(settings.device)
    name = "ours (tuner recipe)" + (" + compile" if settings.compile else "")
    name += " + channels_last" if settings.channels_last else ""
    name += " + dora" if settings.dora else ""
    profiler = profiler_for(settings.profile_dir, name, device, WARMUP_STEPS)
    clock = StepClock()
    timed = TimedLoss(
        clock, recipe.batch_loss, lambda batch: batch["time_ids"].shape[0], FLOPS_STEP, profiler
    )
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as output, PeakMemory(device) as memory:
        config = ours_config(settings, model_dir, data_dir, Path(output))
        with mock.patch.object(recipe, "batch_loss", timed):
            recipe.train_sdxl_lora(config)
        timed.finish()
    # The last step ends when sampling starts; the step starts are what the median uses.
    steps_per_s, samples_per_s = clock.rates(profiler.end if profiler else WARMUP_STEPS)
    return RunFigures(
        name=name,
        steps_per_s=steps_per_s,
        samples_per_s=samples_per_s,
        time_to_first_step_s=clock.time_to_first_step(),
        peak_memory_mb=memory.peak_mb,
        memory_kind=memory.kind,
        flops_per_step=timed.flops,
        mfu=model_flops_utilisation(timed.flops, steps_per_s, device) if timed.flops else None,
    )
