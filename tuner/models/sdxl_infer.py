"""Generate images with SDXL and any number of stacked LoRA adapters, as PNGs that say how they were made.

Models load through `tuner.models.sdxl.load_sdxl`, the code training uses, and adapters through
diffusers' `load_lora_weights`, which reads tuner's adapters, diffusers files and kohya files alike
(tuner's LoKr/LoHa files, which diffusers cannot read, through PEFT: `load_adapter_file`).
Each adapter gets its own name so `set_adapters` can weigh them; `--compare` renders the same seeds
again with the adapters disabled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import SchedulerMixin, StableDiffusionXLPipeline
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

import tuner
from tuner.errors import ConfigError
from tuner.formats.kohya import read_safetensors, resolve_adapter_file
from tuner.models.sdxl import SDXLComponents, load_sdxl
from tuner.models.sdxl_lora import load_adapter_file
from tuner.models.sdxl_sampling import build_pipeline, decode_latents, image_grid
from tuner.tiny import resolve_model_path

TASK = "sdxl-lora"
LABEL_HEIGHT = 16


@dataclass(frozen=True)
class Adapter:
    path: Path
    scale: float = 1.0


@dataclass
class GenerationSettings:
    prompt: str
    negative_prompt: str | None = None
    steps: int = 30
    guidance: float = 5.0
    size: tuple[int, int] = (1024, 1024)
    seed: int = 0
    num_images: int = 1
    model: str = ""
    adapters: list[Adapter] = field(default_factory=list)


def resolve_sdxl_model(name_or_path: str, source: str = "huggingface", offline: bool = False) -> str:
    """Where to load `name_or_path` from: the tiny model for `tiny`/`tiny-sdxl`, else a folder or hub ID."""
    return resolve_model_path(name_or_path, TASK, source, offline)


class _QuietLibraryNotes(logging.Filter):
    """Drops diffusers 0.42 warnings that say nothing a tuner user can act on.

    "No LoRA keys associated to CLIPTextModel found" is logged for every part an adapter does not adapt
    (a UNet-only LoRA, the default); "modules that should be kept in float32: []" for every dtype cast
    of a model that has none.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("No LoRA keys associated to")
            or ("that should be kept in float32: []" in message)
        )


_QUIET = _QuietLibraryNotes()


def quiet_library_notes() -> None:
    """Install the filter on the diffusers loggers that emit those notes (idempotent)."""
    for name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft", "diffusers.models.modeling_utils"):
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)


def load_adapters(pipeline: StableDiffusionXLPipeline, adapters: list[Adapter]) -> list[str]:
    """Load each adapter under its own name and activate them all with their scales; returns the names."""
    quiet_library_notes()
    names = []
    for index, adapter in enumerate(adapters):
        file = resolve_adapter_file(adapter.path)
        name = f"adapter_{index}"
        load_adapter_file(pipeline, file, name)
        names.append(name)
    if names:
        pipeline.set_adapters(names, adapter_weights=[adapter.scale for adapter in adapters])
    return names


def trained_prediction_type(adapters: list[Adapter]) -> str | None:
    """What the adapters' UNet was trained to predict, from their headers; None when none records it.

    tuner writes `tuner.prediction_type` (its kohya copies carry it too); kohya's own files say
    `ss_v_parameterization`. Adapters trained for different targets cannot share one scheduler.
    """

    def recorded(header: dict[str, str]) -> str | None:
        if header.get("tuner.prediction_type") is None and header.get("ss_v_parameterization") == "True":
            return "v_prediction"
        return header.get("tuner.prediction_type")

    return _agreed(adapters, recorded, "prediction types", "train.prediction_type")


def trained_zero_terminal_snr(adapters: list[Adapter]) -> bool | None:
    """Whether the adapters were trained on a zero-terminal-SNR schedule (`tuner.zero_terminal_snr`, or
    kohya's `ss_zero_terminal_snr`); None when none records it (the base model's scheduler decides)."""

    def recorded(header: dict[str, str]) -> bool | None:
        value = header.get("tuner.zero_terminal_snr", header.get("ss_zero_terminal_snr"))
        return None if value is None else value == "True"

    return _agreed(adapters, recorded, "noise schedules", "train.zero_terminal_snr")


def trained_scheduler(components: SDXLComponents, adapters: list[Adapter]) -> SchedulerMixin:
    """The sampler for the UNet with `adapters` on: what they were trained to predict, on the noise
    schedule they were trained on (the base model's where they record neither)."""
    return build_pipeline(
        components, trained_prediction_type(adapters), trained_zero_terminal_snr(adapters)
    ).scheduler


def _agreed(adapters: list[Adapter], recorded, what: str, key: str):
    found: dict[object, Path] = {}
    for adapter in adapters:
        file = resolve_adapter_file(adapter.path)
        _, header = read_safetensors(file)
        value = recorded(header)
        if value is not None:
            found.setdefault(value, file)
    if len(found) > 1:
        listed = ", ".join(f"{file} ({value})" for value, file in found.items())
        raise ConfigError(
            f"the adapters were trained for different {what}: {listed}",
            hint=f"stack only adapters trained with the same {key}",
        )
    return next(iter(found), None)


def generate(
    pipeline: StableDiffusionXLPipeline, components: SDXLComponents, settings: GenerationSettings
) -> list[Image.Image]:
    """One image per seed `seed, seed + 1, ...`; each seed's noise is drawn on the CPU, so it is portable."""
    width, height = settings.size
    images = []
    with torch.no_grad():
        for offset in range(settings.num_images):
            latents = pipeline(
                settings.prompt,
                negative_prompt=settings.negative_prompt,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                width=width,
                height=height,
                generator=torch.Generator("cpu").manual_seed(settings.seed + offset),
                output_type="latent",
            ).images
            images.append(decode_latents(components, latents, pipeline)[0])
    return images


def png_text(settings: GenerationSettings, seed: int, adapters_active: bool = True) -> PngInfo:
    """The PNG text chunk: prompt, seed, model and adapters with scales, plus an A1111-style summary."""
    adapters = [{"path": str(a.path), "scale": a.scale} for a in settings.adapters] if adapters_active else []
    width, height = settings.size
    fields = {
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt or "",
        "seed": str(seed),
        "steps": str(settings.steps),
        "guidance": str(settings.guidance),
        "size": f"{width}x{height}",
        "model": settings.model,
        "adapters": json.dumps(adapters),
        "software": f"tuner {tuner.__version__}",
    }
    info = PngInfo()
    for key, value in fields.items():
        info.add_text(key, value)
    lora_tags = "".join(f" <lora:{Path(a['path']).stem}:{a['scale']}>" for a in adapters)
    info.add_text(
        "parameters",
        f"{settings.prompt}{lora_tags}\nNegative prompt: {settings.negative_prompt or ''}\n"
        f"Steps: {settings.steps}, Sampler: Euler, CFG scale: {settings.guidance}, Seed: {seed}, "
        f"Size: {width}x{height}, Model: {settings.model}",
    )
    return info


def labelled_grid(rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """Rows of images, each under a strip with its label (e.g. `base` / `with adapter`)."""
    width, height = rows[0][1][0].size
    columns = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (columns * width, len(rows) * (height + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (label, images) in enumerate(rows):
        top = row * (height + LABEL_HEIGHT)
        draw.text((2, top + 2), label, fill="black")
        for column, image in enumerate(images):
            canvas.paste(image, (column * width, top + LABEL_HEIGHT))
    return canvas


def infer_sdxl(
    settings: GenerationSettings,
    out: Path,
    *,
    device: str = "auto",
    mixed_precision: str = "auto",
    compare: bool = False,
    source: str = "huggingface",
    offline: bool = False,
) -> list[Path]:
    """Render `settings` into `out` (a `.png` file, or a folder of one PNG per seed plus grids)."""
    from tuner.runtime import resolve_runtime

    if compare and not settings.adapters:
        raise ConfigError("--compare needs at least one --adapter", hint="pass --adapter DIR_OR_FILE")
    runtime = resolve_runtime(device, mixed_precision)
    components = load_sdxl(
        resolve_sdxl_model(settings.model, source, offline), weight_dtype=runtime.compute_dtype
    )
    pipeline = build_pipeline(components).to(runtime.device_type)
    base_scheduler = pipeline.scheduler
    pipeline.scheduler = trained_scheduler(components, settings.adapters)
    load_adapters(pipeline, settings.adapters)
    images = generate(pipeline, components, settings)
    seeds = [settings.seed + offset for offset in range(settings.num_images)]
    written = write_images(images, seeds, settings, Path(out))
    if compare:
        # The base model as it is used without the adapters: its own prediction type and schedule.
        pipeline.disable_lora()
        pipeline.scheduler = base_scheduler
        base_images = generate(pipeline, components, settings)
        grid = labelled_grid([("base", base_images), ("with adapter", images)])
        compare_path = _folder_of(Path(out)) / "compare.png"
        grid.save(compare_path, pnginfo=png_text(settings, settings.seed))
        written.append(compare_path)
    return written


def write_images(
    images: list[Image.Image], seeds: list[int], settings: GenerationSettings, out: Path
) -> list[Path]:
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        image = images[0] if len(images) == 1 else image_grid(images, rows=1, columns=len(images))
        image.save(out, pnginfo=png_text(settings, seeds[0]))
        return [out]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for image, seed in zip(images, seeds, strict=True):
        path = out / f"seed-{seed}.png"
        image.save(path, pnginfo=png_text(settings, seed))
        written.append(path)
    if len(images) > 1:
        grid_path = out / "grid.png"
        image_grid(images, rows=1, columns=len(images)).save(grid_path, pnginfo=png_text(settings, seeds[0]))
        written.append(grid_path)
    return written


def _folder_of(out: Path) -> Path:
    return out.parent if out.suffix.lower() == ".png" else out
