"""Our SDXL trainer against the diffusers example's algorithm, on one model, data set, batch and seed."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from tuner.bench.measure import (
    PeakMemory,
    RunFigures,
    StepClock,
    TimedLoss,
    model_flops_utilisation,
    release_freed_memory,
)
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

    @property
    def mixed_precision(self) -> str:
        return "no" if self.device == "cpu" else "bf16"


def run_sdxl_bench(settings: SDXLBenchSettings, work_dir: Path, baseline: bool = True) -> list[RunFigures]:
    """Build (once) the model and images, then run the baseline (if asked) and our trainer."""
    model_dir = build_sdxl_pipeline(settings.scale, work_dir / f"sdxl-{settings.scale}")
    data_dir = work_dir / f"images-{settings.resolution}-{settings.images}"
    if not data_dir.exists():
        write_captioned_images(data_dir, settings.images, settings.resolution, settings.seed)
    device = torch.device(settings.device)
    figures = []
    if baseline:
        figures.append(
            train_baseline_sdxl(
                model_dir,
                data_dir,
                steps=settings.steps,
                batch_size=settings.batch_size,
                resolution=settings.resolution,
                rank=LORA_RANK,
                lr=LEARNING_RATE,
                seed=settings.seed,
                device=device,
                weight_dtype=torch.float32 if settings.mixed_precision == "no" else torch.bfloat16,
                warmup=WARMUP_STEPS,
            )
        )
        release_freed_memory()
    figures.append(train_ours_sdxl(settings, model_dir, data_dir))
    return figures


def ours_config(settings: SDXLBenchSettings, model_dir: Path, data_dir: Path, output_dir: Path) -> RunConfig:
    """The run config of our recipe for this benchmark: defaults (cached latents and embeddings, AdamW)."""
    return RunConfig.model_validate(
        {
            "task": "sdxl-lora",
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(data_dir), "resolution": settings.resolution, "bucketing": False},
            "lora": {"rank": LORA_RANK, "alpha": LORA_RANK},
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
            },
        }
    )


def train_ours_sdxl(settings: SDXLBenchSettings, model_dir: Path, data_dir: Path) -> RunFigures:
    """Our recipe end to end (`train_sdxl_lora`) with its loss timed; caching counts to the first step."""
    from tuner.recipes import sdxl as recipe

    device = torch.device(settings.device)
    clock = StepClock()
    timed = TimedLoss(clock, recipe.batch_loss, lambda batch: batch["time_ids"].shape[0], FLOPS_STEP)
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as output, PeakMemory(device) as memory:
        config = ours_config(settings, model_dir, data_dir, Path(output))
        with mock.patch.object(recipe, "batch_loss", timed), _channels_last(settings.channels_last):
            recipe.train_sdxl_lora(config)
        timed.stop_counting()
    # The last step ends when sampling starts; the step starts are what the median uses.
    steps_per_s, samples_per_s = clock.rates(WARMUP_STEPS)
    name = "ours (tuner recipe)" + (" + compile" if settings.compile else "")
    name += " + channels_last" if settings.channels_last else ""
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


@contextlib.contextmanager
def _channels_last(enabled: bool) -> Iterator[None]:
    """Our recipe with its UNet in channels-last memory format (an experiment; the recipe has no key)."""
    if not enabled:
        yield
        return
    from tuner.recipes import sdxl as recipe

    configure = recipe.configure_unet_attention

    def configure_and_convert(unet: torch.nn.Module, runtime) -> None:
        configure(unet, runtime)
        unet.to(memory_format=torch.channels_last)

    with mock.patch.object(recipe, "configure_unet_attention", configure_and_convert):
        yield
