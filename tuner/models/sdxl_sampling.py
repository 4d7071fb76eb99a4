"""Sample images from the model being trained: a prompt x seed grid written as one PNG.

The pipeline is built around the in-memory components, so the UNet's LoRA (and the text encoders',
if any) is exactly what is being trained; sampling uses Euler, as SDXL base ships with. A cached run
encodes its sample prompts once (`encode_sample_prompts`) and releases the text encoders, which the
training step no longer needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from tuner.models.sdxl import SDXLComponents


def build_pipeline(
    components: SDXLComponents, prediction_type: str | None = None, zero_terminal_snr: bool | None = None
) -> StableDiffusionXLPipeline:
    """A pipeline around loaded components, sampling with Euler as SDXL base ships.

    `prediction_type` is what the UNet was trained to predict (`train.prediction_type`, recorded in the
    adapter as `tuner.prediction_type`), `zero_terminal_snr` whether on rescaled betas
    (`tuner.zero_terminal_snr`); None keeps the model scheduler's. The scheduler turns the UNet's output
    into the next latents, so it must read that output as what the UNet was trained to predict, on the
    schedule it was trained on.
    """
    overrides: dict[str, object] = {"prediction_type": prediction_type} if prediction_type else {}
    if zero_terminal_snr is not None:
        overrides["rescale_betas_zero_snr"] = zero_terminal_snr
    scheduler = EulerDiscreteScheduler.from_config(components.noise_scheduler.config, **overrides)
    if scheduler.config.rescale_betas_zero_snr:
        # Sampling must start at the last timestep, whose input is pure noise on this schedule; SDXL's
        # `leading` spacing starts below it (Lin et al. 2024, section 3.3; diffusers' scheduler docs).
        scheduler = EulerDiscreteScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    pipeline = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=components.unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@dataclass(frozen=True)
class EncodedPrompt:
    """A sample prompt as the pipeline encodes it for classifier-free guidance (both halves)."""

    prompt: str
    embeds: torch.Tensor
    negative_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_pooled: torch.Tensor

    def pipeline_arguments(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeds": self.embeds.to(device),
            "negative_prompt_embeds": self.negative_embeds.to(device),
            "pooled_prompt_embeds": self.pooled.to(device),
            "negative_pooled_prompt_embeds": self.negative_pooled.to(device),
        }


def encode_sample_prompts(
    components: SDXLComponents, prompts: Sequence[str], device: torch.device | str
) -> list[EncodedPrompt]:
    """Each prompt through the pipeline's own `encode_prompt` (so sampling from these equals sampling
    from the text), kept on the CPU."""
    pipeline = build_pipeline(components)
    encoded = []
    with _on_device(components, device), torch.no_grad():
        for prompt in prompts:
            embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
                prompt, device=torch.device(device), do_classifier_free_guidance=True
            )
            encoded.append(
                EncodedPrompt(prompt, embeds.cpu(), negative.cpu(), pooled.cpu(), negative_pooled.cpu())
            )
    return encoded


def sample_images(
    components: SDXLComponents,
    prompts: Sequence[str | EncodedPrompt],
    seeds: list[int],
    steps: int,
    size: tuple[int, int],
    out_png: Path,
    *,
    device: torch.device | str,
    guidance_scale: float = 5.0,
    prediction_type: str | None = None,
) -> Path:
    """Write a grid of `size` (width, height) images, one row per prompt and one column per seed.

    The VAE and text encoders are moved to `device` for the call and back afterwards (a cached run
    keeps them off the accelerator); the UNet is put in eval mode (no LoRA dropout) and restored.
    `prediction_type`: see `build_pipeline`.
    """
    width, height = size
    pipeline = build_pipeline(components, prediction_type)
    images = []
    with _on_device(components, device), _eval_mode(components.unet), torch.no_grad():
        for prompt in prompts:
            if isinstance(prompt, EncodedPrompt):
                text = {"prompt": None, **prompt.pipeline_arguments(device)}
            else:
                text = {"prompt": prompt}
            for seed in seeds:
                latents = pipeline(
                    **text,
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
    # Released text encoders (None) stay released.
    candidates = (components.vae, components.text_encoder, components.text_encoder_2)
    modules = [module for module in candidates if module is not None]
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
