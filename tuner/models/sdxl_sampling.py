"""Sample images from the model being trained: a prompt x seed grid written as one PNG.

The pipeline is built around the in-memory components, so the UNet's LoRA (and the text encoders',
if any) is exactly what is being trained; sampling uses Euler, as SDXL base ships with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from tuner.models.sdxl import SDXLComponents


def build_pipeline(components: SDXLComponents) -> StableDiffusionXLPipeline:
    """A pipeline around loaded components, sampling with Euler as SDXL base ships."""
    pipeline = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=components.unet,
        scheduler=EulerDiscreteScheduler.from_config(components.noise_scheduler.config),
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample_images(
    components: SDXLComponents,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    size: tuple[int, int],
    out_png: Path,
    *,
    device: torch.device | str,
    guidance_scale: float = 5.0,
) -> Path:
    """Write a grid of `size` (width, height) images, one row per prompt and one column per seed.

    The VAE and text encoders are moved to `device` for the call and back afterwards (a cached run
    keeps them off the accelerator); the UNet is put in eval mode (no LoRA dropout) and restored.
    """
    width, height = size
    pipeline = build_pipeline(components)
    images = []
    with _on_device(components, device), _eval_mode(components.unet), torch.no_grad():
        for prompt in prompts:
            for seed in seeds:
                latents = pipeline(
                    prompt,
                    num_inference_steps=steps,
                    width=width,
                    height=height,
                    guidance_scale=guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="latent",
                ).images
                images.append(decode_latents(components, latents, pipeline)[0])
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, rows=len(prompts), columns=len(seeds)).save(out_png)
    return out_png


def decode_latents(
    components: SDXLComponents, latents: torch.Tensor, pipeline: StableDiffusionXLPipeline
) -> list[Image.Image]:
    # Decoding here rather than in the pipeline: diffusers 0.42 decodes bf16 latents with an fp32 VAE
    # without casting them, which fails with a dtype mismatch.
    vae = components.vae
    with torch.autocast(device_type=vae.device.type, enabled=False):
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipeline.image_processor.postprocess(pixels.float(), output_type="pil")


def image_grid(images: list[Image.Image], rows: int, columns: int) -> Image.Image:
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


@contextlib.contextmanager
def _on_device(components: SDXLComponents, device: torch.device | str) -> Iterator[None]:
    modules = [components.vae, components.text_encoder, components.text_encoder_2]
    original_devices = [module.device for module in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, original in zip(modules, original_devices, strict=True):
            module.to(original)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
