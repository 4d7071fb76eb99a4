"""The reference SDXL LoRA step, as diffusers' `train_text_to_image_lora_sdxl.py` example takes it.

Written from the example's algorithm, not copied: every step loads and transforms the images, encodes
them with the fp32 VAE (a posterior *sample*), runs both text encoders, noises with DDPM, predicts with
the UNet (PEFT LoRA on to_k/to_q/to_v/to_out.0, gaussian init), takes the plain MSE, clips gradients
and steps a plain AdamW; the loss is read back (`.item()`) every step for logging. As in the example,
the frozen UNet and text encoders are stored in the compute dtype, the LoRA parameters in fp32.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image
from torchvision import transforms
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tuner.bench.measure import PeakMemory, RunFigures, StepClock, model_flops_utilisation

EXAMPLE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def train_baseline_sdxl(
    model_dir: Path,
    data_dir: Path,
    *,
    steps: int,
    batch_size: int,
    resolution: int,
    rank: int,
    lr: float,
    seed: int,
    device: torch.device,
    weight_dtype: torch.dtype,
    warmup: int,
) -> RunFigures:
    """Train `steps` steps the example's way and measure them (same figures as our trainer's)."""
    clock = StepClock()
    with PeakMemory(device) as memory:
        torch.manual_seed(seed)
        tokenizers = [
            CLIPTokenizer.from_pretrained(model_dir, subfolder=name) for name in ("tokenizer", "tokenizer_2")
        ]
        text_encoders = [
            CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=weight_dtype),
            CLIPTextModelWithProjection.from_pretrained(
                model_dir, subfolder="text_encoder_2", dtype=weight_dtype
            ),
        ]
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", dtype=weight_dtype)
        scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        for module in (vae, unet, *text_encoders):
            module.requires_grad_(False)
            module.to(device)
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=EXAMPLE_TARGETS)
        )
        lora_parameters = [parameter for parameter in unet.parameters() if parameter.requires_grad]
        for parameter in lora_parameters:
            parameter.data = parameter.data.float()
        optimizer = torch.optim.AdamW(lora_parameters, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        images = sorted(data_dir.glob("*.png"))
        image_transform = transforms.Compose(
            [
                transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(resolution),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )
        order = random.Random(seed)
        autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
        flops = None
        for step in range(steps):
            clock.tick(batch_size)
            chosen = [order.choice(images) for _ in range(batch_size)]
            pixel_values = torch.stack([image_transform(Image.open(path).convert("RGB")) for path in chosen])
            captions = [path.with_suffix(".txt").read_text(encoding="utf-8").strip() for path in chosen]
            counter = _flop_counter() if step == 1 else None
            with counter or contextlib.nullcontext():
                with autocast:
                    loss = _example_loss(
                        unet,
                        vae,
                        text_encoders,
                        tokenizers,
                        scheduler,
                        pixel_values,
                        captions,
                        resolution,
                        device,
                    )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(lora_parameters, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            if counter is not None:
                flops = float(counter.get_total_flops())
            loss.detach().item()
        clock.tick(0)
    steps_per_s, samples_per_s = clock.rates(warmup)
    return RunFigures(
        name="baseline (diffusers example algorithm)",
        steps_per_s=steps_per_s,
        samples_per_s=samples_per_s,
        time_to_first_step_s=clock.time_to_first_step(),
        peak_memory_mb=memory.peak_mb,
        memory_kind=memory.kind,
        flops_per_step=flops,
        mfu=model_flops_utilisation(flops, steps_per_s, device) if flops else None,
    )


def _example_loss(
    unet, vae, text_encoders, tokenizers, scheduler, pixel_values, captions, resolution, device
):
    with torch.autocast(device.type, enabled=False):
        latents = vae.encode(pixel_values.to(device, torch.float32)).latent_dist.sample()
    latents = (latents * vae.config.scaling_factor).to(unet.dtype)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    hidden_states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        output = encoder(ids.to(device), output_hidden_states=True)
        pooled = output[0]
        hidden_states.append(output.hidden_states[-2])
    prompt_embeds = torch.cat(hidden_states, dim=-1)
    # original size, crop top-left, target size: the example's centre crop of a square image.
    time_ids = torch.tensor(
        [[resolution, resolution, 0, 0, resolution, resolution]] * latents.shape[0], device=device
    )
    prediction = unet(
        noisy_latents,
        timesteps,
        prompt_embeds,
        added_cond_kwargs={"time_ids": time_ids.to(unet.dtype), "text_embeds": pooled},
        return_dict=False,
    )[0]
    return F.mse_loss(prediction.float(), noise.float(), reduction="mean")


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)
