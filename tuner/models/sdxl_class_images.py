"""Class images for prior preservation, rendered by the base model (`tuner generate-class-images`).

A folder of `class-NNNNN.png` images, each beside `class-NNNNN.txt` holding its prompt, so that it reads
as a training folder (`--reg-data DIR`). Image number n is rendered from the seed `sample_seed(seed, n,
0)`, whatever else is rendered in the same call, so a resumed or repeated run draws the same image for
the same number. Every file is written to a hidden temporary file and moved into place with
`os.replace`, caption first: an interrupted run leaves only hidden temporary files (ignored and
removed) or a caption without its image (rewritten), never a half-written image.

Resuming: the folder counts as holding enough when it has `count` images or more (its own numbered ones
and any others, as diffusers' and kohya's DreamBooth scripts count); otherwise the lowest missing numbers
are rendered until it does. One run per folder at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from tqdm.auto import tqdm

from tuner.atomic import TEMP_SUFFIX, write_atomically
from tuner.data.images import IMAGE_EXTENSIONS
from tuner.distributed import sample_seed
from tuner.errors import ConfigError
from tuner.models.sdxl import SDXLComponents, load_sdxl
from tuner.models.sdxl_infer import GenerationSettings, png_text, resolve_sdxl_model
from tuner.models.sdxl_sampling import build_pipeline, decode_latents

CLASS_IMAGE_NAME = "class-{:05d}"
# The hidden temporary files of `write_atomically` for class images.
_TEMP_PREFIX = ".class-"


@dataclass(frozen=True)
class ClassImageSettings:
    prompt: str
    count: int
    resolution: int = 1024
    steps: int = 30
    guidance_scale: float = 5.0
    seed: int = 0
    batch_size: int = 1
    negative_prompt: str | None = None


@dataclass(frozen=True)
class ClassImagesResult:
    held_before: int  # images in the folder before this run
    written: list[Path]  # the images this run rendered


def class_image_seed(seed: int, number: int) -> int:
    """The seed of class image `number`: a pure function of (seed, number), so reruns draw it again."""
    return sample_seed(seed, number, 0)


def images_in(folder: Path) -> list[Path]:
    """The images a training run would read from `folder` (hidden and temporary files are not images)."""
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def numbers_to_render(folder: Path, count: int) -> tuple[int, list[int]]:
    """(images the folder holds, the numbers to render): the lowest numbers below `count` whose image
    is missing, as many as the folder lacks to hold `count` images."""
    held = len(images_in(folder))
    missing = [n for n in range(count) if not (folder / f"{CLASS_IMAGE_NAME.format(n)}.png").exists()]
    return held, missing[: max(count - held, 0)]


def check_settings(settings: ClassImageSettings) -> None:
    for name in ("count", "steps", "batch_size"):
        if getattr(settings, name) < 1:
            flag = name.replace("_", "-")
            raise ConfigError(
                f"--{flag} must be at least 1, not {getattr(settings, name)}", hint=f"pass --{flag} N"
            )
    if settings.resolution < 8 or settings.resolution % 8:
        raise ConfigError(
            f"--resolution {settings.resolution} is not a positive multiple of 8 (SDXL's VAE needs it)",
            hint="e.g. --resolution 1024",
        )
    if not settings.prompt.strip():
        raise ConfigError(
            "--class-prompt is empty", hint='name the class, e.g. --class-prompt "a photo of a dog"'
        )


def generate_class_images(
    model: str,
    settings: ClassImageSettings,
    out: Path,
    *,
    device: str = "auto",
    mixed_precision: str = "auto",
    source: str = "huggingface",
    offline: bool = False,
    show_progress: bool = True,
) -> ClassImagesResult:
    """Render the class images `out` lacks with the base model `model` (`tiny`: the tiny SDXL)."""
    check_settings(settings)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file", hint="pass a folder for the class images")
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f"{_TEMP_PREFIX}*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)  # an interrupted run's; see the module docstring
    held, numbers = numbers_to_render(out, settings.count)
    if not numbers:
        return ClassImagesResult(held_before=held, written=[])

    from tuner.runtime import resolve_runtime

    runtime = resolve_runtime(device, mixed_precision)
    components = load_sdxl(resolve_sdxl_model(model, source, offline), weight_dtype=runtime.compute_dtype)
    pipeline = build_pipeline(components).to(runtime.device_type)
    written = []
    with tqdm(total=len(numbers), desc="class images", unit="image", disable=not show_progress) as bar:
        for start in range(0, len(numbers), settings.batch_size):
            batch = numbers[start : start + settings.batch_size]
            images = _render(
                pipeline, components, settings, [class_image_seed(settings.seed, n) for n in batch]
            )
            for number, image in zip(batch, images, strict=True):
                written.append(_write_class_image(out, number, image, settings, model))
            bar.update(len(batch))
    return ClassImagesResult(held_before=held, written=written)


def _render(
    pipeline: StableDiffusionXLPipeline,
    components: SDXLComponents,
    settings: ClassImageSettings,
    seeds: list[int],
) -> list[Image.Image]:
    count = len(seeds)
    with torch.no_grad():
        latents = pipeline(
            [settings.prompt] * count,
            negative_prompt=[settings.negative_prompt] * count if settings.negative_prompt else None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            width=settings.resolution,
            height=settings.resolution,
            # One CPU generator per image: its starting noise depends on its own seed only.
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            output_type="latent",
        ).images
        return decode_latents(components, latents, pipeline)


def _write_class_image(
    out: Path, number: int, image: Image.Image, settings: ClassImageSettings, model: str
) -> Path:
    stem = CLASS_IMAGE_NAME.format(number)
    seed = class_image_seed(settings.seed, number)
    info = png_text(
        GenerationSettings(
            prompt=settings.prompt,
            negative_prompt=settings.negative_prompt,
            steps=settings.steps,
            guidance=settings.guidance_scale,
            size=(settings.resolution, settings.resolution),
            seed=seed,
            model=model,
        ),
        seed,
    )
    # The caption first: the image is what marks the number as done.
    write_atomically(
        out / f"{stem}.txt", lambda path: path.write_text(settings.prompt + "\n", encoding="utf-8")
    )
    return write_atomically(out / f"{stem}.png", lambda path: image.save(path, format="PNG", pnginfo=info))
