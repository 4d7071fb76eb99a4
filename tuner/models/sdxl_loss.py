"""The SDXL training objective: DDPM forward noising, the epsilon or v-prediction target, min-SNR weighting.

Noise options follow the community recipes: `noise_offset` (Guttenberg's offset noise, as in the
diffusers examples) and `pyramid_noise_discount` (multi-resolution "pyramid" noise, as in kohya's
`--multires_noise_discount`). Random draws take an optional `generator` so validation can reuse noise.

The prediction type and the noise schedule (the model's betas, or betas rescaled to zero terminal SNR,
Lin et al. 2024, kohya's `--zero_terminal_snr`) are chosen once per run by `choose_schedule`, from the
config, the model's scheduler config and a single-file checkpoint's `v_pred` / `ztsnr` keys. The loss is
the squared error, or kohya's pseudo-Huber / smooth-L1 with a per-timestep delta (`huber_deltas`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from tuner.errors import ConfigError, ModelError
from tuner.models.sdxl import (
    V_PREDICTION_MARKER,
    WINDOW_TOKENS,
    ZERO_TERMINAL_SNR_MARKER,
    SDXLComponents,
    encode_latents,
    encode_prompt,
)
from tuner.models.sdxl_lora import has_lora

if TYPE_CHECKING:
    from tuner.training.loop import LossParts

PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSSES = ("mse", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# kohya's defaults (--huber_c 0.1 --huber_schedule snr), the schema's too.
HUBER_DEFAULTS = (0.1, "snr")
# Pyramid noise stops after this many octaves, or earlier at a 1x1 level.
_PYRAMID_LEVELS = 10


@dataclass(frozen=True)
class NoiseSettings:
    prediction_type: str
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    pyramid_noise_discount: float = 0.0
    timestep_min: int = 0
    timestep_max: int = 1000
    # `mse`, or kohya's `huber` / `smooth_l1` (pseudo-Huber) with delta `huber_c` on `huber_schedule`.
    loss: str = "mse"
    huber_c: float = 0.1
    huber_schedule: str = "snr"


@dataclass(frozen=True)
class Schedule:
    """What the UNet is trained to predict, on which noise schedule, and why: the line a run starts with."""

    prediction_type: str
    zero_terminal_snr: bool
    prediction_type_from: str
    zero_terminal_snr_from: str

    def describe(self) -> str:
        betas = "zero terminal SNR (rescaled betas)" if self.zero_terminal_snr else "the model's betas"
        return (
            f"prediction type: {self.prediction_type} (from {self.prediction_type_from}); "
            f"noise schedule: {betas} (from {self.zero_terminal_snr_from})"
        )


def choose_schedule(
    noise_scheduler: DDPMScheduler,
    markers: frozenset[str] = frozenset(),
    *,
    prediction_type: str = "auto",
    zero_terminal_snr: bool | str = "auto",
) -> Schedule:
    """Resolve `train.prediction_type` and `train.zero_terminal_snr`; `auto` takes the model's scheduler,
    which `load_sdxl` has already set from a single-file checkpoint's `v_pred` / `ztsnr` keys (`markers`).

    Zero terminal SNR with an epsilon target is refused: at the last timestep the noisy latents are the
    noise itself, so the target is the input and the sampler's first step (infinite sigma) learns nothing;
    the paper and kohya pair it with v-prediction.
    """
    config = noise_scheduler.config
    v_marked = V_PREDICTION_MARKER in markers
    if prediction_type == "auto":
        prediction_type = config.prediction_type
        prediction_type_from = "the checkpoint's v_pred key" if v_marked else "the model's scheduler config"
        if prediction_type not in PREDICTION_TYPES:
            raise ModelError(
                f"the model's scheduler predicts {prediction_type!r}, which SDXL LoRA training cannot train",
                hint="set train.prediction_type to epsilon or v_prediction",
            )
    else:
        prediction_type_from = "train.prediction_type"
    if zero_terminal_snr == "auto":
        zero_terminal_snr = bool(config.get("rescale_betas_zero_snr", False))
        marked = v_marked and ZERO_TERMINAL_SNR_MARKER in markers
        zero_terminal_snr_from = "the checkpoint's ztsnr key" if marked else "the model's scheduler config"
    else:
        zero_terminal_snr_from = "train.zero_terminal_snr"
    if zero_terminal_snr and prediction_type == "epsilon":
        raise ConfigError(
            f"a zero-terminal-SNR schedule ({zero_terminal_snr_from}) with an epsilon target "
            f"({prediction_type_from}): at the last timestep the input is pure noise, so the target is "
            "the input",
            hint="set train.prediction_type=v_prediction, or train.zero_terminal_snr=false",
        )
    return Schedule(prediction_type, bool(zero_terminal_snr), prediction_type_from, zero_terminal_snr_from)


def training_scheduler(noise_scheduler: DDPMScheduler, schedule: Schedule) -> DDPMScheduler:
    """The model's DDPM scheduler set to `schedule`: diffusers rescales its betas when
    `rescale_betas_zero_snr` is on (`rescale_zero_terminal_snr`), and samplers built from its config
    inherit both settings."""
    return DDPMScheduler.from_config(
        noise_scheduler.config,
        prediction_type=schedule.prediction_type,
        rescale_betas_zero_snr=schedule.zero_terminal_snr,
    )


def noise_settings(
    noise_scheduler: DDPMScheduler,
    *,
    prediction_type: str = "auto",
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    pyramid_noise_discount: float = 0.0,
    timestep_min: int = 0,
    timestep_max: int = 1000,
    loss: str = "mse",
    huber_c: float = 0.1,
    huber_schedule: str = "snr",
) -> NoiseSettings:
    """Check the options against the model's scheduler; `auto` takes the scheduler's prediction type."""
    if prediction_type == "auto":
        prediction_type = choose_schedule(noise_scheduler, zero_terminal_snr=False).prediction_type
    if loss == "mse" and (huber_c, huber_schedule) != HUBER_DEFAULTS:
        raise ConfigError(
            f"train.huber_c={huber_c} / train.huber_schedule={huber_schedule!r} is set, but train.loss "
            "is mse, which has no delta",
            hint="set train.loss=huber or smooth_l1, or leave the Huber settings out",
        )
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if not 0 <= timestep_min < timestep_max <= num_train_timesteps:
        raise ConfigError(
            f"timestep range [{timestep_min}, {timestep_max}) is empty or outside the model's "
            f"{num_train_timesteps} training timesteps",
            hint=f"use 0 <= train.timestep_min < train.timestep_max <= {num_train_timesteps}",
        )
    return NoiseSettings(
        prediction_type=prediction_type,
        snr_gamma=snr_gamma,
        noise_offset=noise_offset,
        pyramid_noise_discount=pyramid_noise_discount,
        timestep_min=timestep_min,
        timestep_max=timestep_max,
        loss=loss,
        huber_c=huber_c,
        huber_schedule=huber_schedule,
    )


def huber_deltas(
    noise_scheduler: DDPMScheduler, settings: NoiseSettings, timesteps: torch.Tensor
) -> torch.Tensor:
    """Each sample's pseudo-Huber delta at its timestep, kohya's schedules of `huber_c` (sd-scripts'
    `--huber_schedule`, from "Improving Diffusion Models's Data-Corruption Resistance using Scheduled
    Pseudo-Huber Loss"): `constant` c; `exponential` from 1 at t = 0 down to c at the last timestep;
    `snr` c + (1 - c) / (1 + sigma)^2 with sigma = sqrt((1 - alpha_bar) / alpha_bar), near 1 where the
    image is barely noised and c where it is mostly noise (c at zero terminal SNR's last step)."""
    c = settings.huber_c
    steps = timesteps.to(torch.float32)
    if settings.huber_schedule == "constant":
        return torch.full_like(steps, c)
    if settings.huber_schedule == "exponential":
        return torch.exp(steps * math.log(c) / noise_scheduler.config.num_train_timesteps)
    alpha_bar = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    return c + (1 - c) / (1 + sigma) ** 2


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss: str, deltas: torch.Tensor | None = None
) -> torch.Tensor:
    """The per-element error: squared (`mse`), or pseudo-Huber with each sample's delta (B,), scaled as
    kohya's `huber` (2c(sqrt(r^2 + c^2) - c): r^2 for small r, 2c|r| for large) or `smooth_l1`
    (2(sqrt(r^2 + c^2) - c): r^2 / c for small r, 2|r| for large)."""
    if loss == "mse":
        return F.mse_loss(prediction, target, reduction="none")
    delta = deltas.view(-1, *([1] * (prediction.ndim - 1)))
    smooth = 2 * (torch.sqrt((prediction - target) ** 2 + delta**2) - delta)
    return delta * smooth if loss == "huber" else smooth


def sample_noise(
    latents: torch.Tensor, settings: NoiseSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, with the configured offset and pyramid noise added."""
    noise = _randn(latents.shape, latents, generator)
    if settings.pyramid_noise_discount > 0:
        noise = _pyramid_noise(noise, settings.pyramid_noise_discount, generator)
    if settings.noise_offset > 0:
        batch, channels = latents.shape[:2]
        noise = noise + settings.noise_offset * _randn((batch, channels, 1, 1), latents, generator)
    return noise


def _pyramid_noise(noise: torch.Tensor, discount: float, generator: torch.Generator | None) -> torch.Tensor:
    batch, channels, height, width = noise.shape
    for level in range(1, _PYRAMID_LEVELS):
        # A random scale in [2, 4) per octave, as kohya does, so levels do not align on a fixed grid.
        scale = (2 + 2 * _rand(generator)) ** level
        small_height, small_width = max(1, int(height / scale)), max(1, int(width / scale))
        coarse = _randn((batch, channels, small_height, small_width), noise, generator)
        noise = noise + discount**level * F.interpolate(coarse, size=(height, width), mode="bilinear")
        if small_height == 1 or small_width == 1:
            break
    # Back to unit variance, which the noise schedule assumes.
    return noise / noise.std()


def _rand(generator: torch.Generator | None) -> float:
    device = generator.device if generator is not None else None
    return torch.rand((), generator=generator, device=device).item()


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def sample_timesteps(
    batch_size: int,
    settings: NoiseSettings,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform integer timesteps in [timestep_min, timestep_max)."""
    draw_device = generator.device if generator is not None else device
    timesteps = torch.randint(
        settings.timestep_min, settings.timestep_max, (batch_size,), generator=generator, device=draw_device
    )
    return timesteps.to(device)


def seeded_noise_and_timesteps(
    latents: torch.Tensor, settings: NoiseSettings, sample_seeds: torch.Tensor, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's noise and timestep from a CPU generator seeded with its seed.

    What a sample draws then does not depend on the process, batch or micro-batch it lands in, so a
    run on N processes with batch b matches one process with batch N*b (the per-process RNGs differ).
    Pyramid noise is normalised per sample instead of per batch.
    """
    noises, timesteps = [], []
    for row, seed in zip(latents, sample_seeds.tolist(), strict=True):
        generator = torch.Generator().manual_seed(seed)
        noises.append(sample_noise(row[None], settings, generator))
        timesteps.append(sample_timesteps(1, settings, device, generator))
    return torch.cat(noises), torch.cat(timesteps)


def snr(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, in fp32."""
    alpha_bar = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an epsilon or v-prediction target.

    min(snr, gamma) / snr for epsilon, written as min(1, gamma / snr) so a zero-terminal-SNR
    schedule's snr == 0 gives weight 1 instead of 0 / 0; min(snr, gamma) / (snr + 1) for v-prediction.
    """
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr_values, max=1.0)
    return torch.clamp(snr_values, max=gamma) / (snr_values + 1)


def diffusion_loss(
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
    settings: NoiseSettings,
    *,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    time_ids: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    reduction: Literal["mean", "none"] = "mean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (optionally min-SNR weighted) error (`settings.loss`: MSE or pseudo-Huber, `elementwise_loss`)
    between the UNet's prediction and the target, in fp32; with `reduction="none"` each sample's loss
    (shape B), for weighting samples (`prior_weighted_loss`). With a `mask` (B, 1, h, w), each sample's
    error is the mask-weighted mean (`masked_mean`)."""
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if settings.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    dtype = unet.dtype
    prediction = unet(
        noisy_latents.to(dtype),
        timesteps,
        encoder_hidden_states=prompt_embeds.to(dtype),
        added_cond_kwargs={"text_embeds": pooled_prompt_embeds.to(dtype), "time_ids": time_ids.to(dtype)},
        return_dict=False,
    )[0]
    deltas = None if settings.loss == "mse" else huber_deltas(noise_scheduler, settings, timesteps)
    error = elementwise_loss(prediction.float(), target.float(), settings.loss, deltas)
    if mask is None:
        per_sample = error.mean(dim=tuple(range(1, prediction.ndim)))
    else:
        per_sample = masked_mean(error, mask)
    if settings.snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(
            snr(noise_scheduler, timesteps), settings.snr_gamma, settings.prediction_type
        )
    return per_sample.mean() if reduction == "mean" else per_sample


def masked_mean(squared_error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sample's squared error weighted by its (B, 1, h, w) mask, divided by the mask's area.

    Dividing by the area (the mask's sum over h and w, times the channels) instead of by every latent
    keeps the loss of the trained part at the scale of an unmasked loss, so a small mask does not shrink
    the learning rate. A mask of ones gives exactly the unmasked mean. A sample whose crop kept no
    masked-in pixel has a loss of zero (its area is clamped, not divided by).
    """
    mask = mask.to(device=squared_error.device, dtype=squared_error.dtype)
    dims = tuple(range(1, squared_error.ndim))
    area = mask.sum(dim=dims) * squared_error.shape[1]
    return (squared_error * mask).sum(dim=dims) / area.clamp(min=torch.finfo(area.dtype).tiny)


def prior_weighted_loss(
    per_sample: torch.Tensor, prior: torch.Tensor | None, prior_loss_weight: float
) -> tuple[torch.Tensor, LossParts]:
    """The batch's loss with class (prior) samples weighted, and its instance and prior parts for logging.

    kohya's semantics: a regularisation image is a member of the batch whose loss weighs
    `prior_loss_weight` (instance images weigh 1), and the loss is the mean over the whole batch. The
    parts are (sum of the unweighted per-sample losses, number of samples) per kind. Without prior
    samples every weight is exactly 1.0, so the loss is bit for bit `per_sample.mean()`.
    """
    if prior is None:
        prior = torch.zeros(per_sample.shape, dtype=torch.bool, device=per_sample.device)
    prior = prior.to(per_sample.device)
    weights = torch.where(prior, prior_loss_weight, 1.0).to(per_sample.dtype)
    values = per_sample.detach()
    # torch.where, not values[prior]: boolean indexing would wait for the device on every batch.
    parts = {
        "instance": (torch.where(prior, 0.0, values).sum(), (~prior).sum()),
        "prior": (torch.where(prior, values, 0.0).sum(), prior.sum()),
    }
    return (per_sample * weights).mean(), parts


class SDXLLoraModel(torch.nn.Module):
    """What the training loop trains: `model(batch)` is the loss of one batch.

    A batch holds `latents` (cached) or `pixel_values` (encoded here by the frozen VAE), and
    `prompt_embeds` + `pooled_prompt_embeds` (cached) or `caption` (encoded here, with gradients when
    the text encoders carry LoRA; to `max_caption_tokens`, see `encode_prompt`), plus `time_ids`.
    Noise and timesteps come from each sample's own generator when the batch has `sample_seed` (see
    `tuner.distributed.PerSampleSeeds`), else from the global torch RNG (seeded by the loop). Only the
    modules a batch needs are registered, so a cached run leaves the VAE and text encoders off the
    accelerator.

    A batch's `mask` ((B, 1, h, w) at latent resolution, 1 = trained; `data.masked_loss`) weighs each
    latent's error (see `masked_mean`); without one the loss is the plain mean.

    A batch's `prior` (bool, B) marks regularisation (class) images, whose loss weighs
    `prior_loss_weight` (see `prior_weighted_loss`); `model(batch, with_parts=True)` also returns the
    instance and prior parts of the loss, for the loop to log.
    """

    def __init__(
        self,
        components: SDXLComponents,
        settings: NoiseSettings,
        *,
        encodes_images: bool,
        encodes_captions: bool,
        prior_loss_weight: float = 1.0,
        max_caption_tokens: int = WINDOW_TOKENS,
    ) -> None:
        super().__init__()
        self.unet = components.unet
        self.vae = components.vae if encodes_images else None
        self.text_encoder = components.text_encoder if encodes_captions else None
        self.text_encoder_2 = components.text_encoder_2 if encodes_captions else None
        self.components = components
        self.settings = settings
        self.prior_loss_weight = prior_loss_weight
        self.max_caption_tokens = max_caption_tokens

    def forward(self, batch: dict, with_parts: bool = False) -> torch.Tensor | tuple[torch.Tensor, LossParts]:
        device = self.unet.device
        latents = batch.get("latents")
        if latents is None:
            with torch.no_grad():
                latents = encode_latents(self.components, batch["pixel_values"])
        latents = latents.to(device=device, dtype=torch.float32)
        if "prompt_embeds" in batch:
            prompt_embeds, pooled_prompt_embeds = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        else:
            trains_text = has_lora(self.text_encoder) or has_lora(self.text_encoder_2)
            with torch.set_grad_enabled(trains_text and torch.is_grad_enabled()):
                prompt_embeds, pooled_prompt_embeds = encode_prompt(
                    self.components, batch["caption"], device, self.max_caption_tokens
                )
        if "sample_seed" in batch:
            seeds = batch["sample_seed"]
            noise, timesteps = seeded_noise_and_timesteps(latents, self.settings, seeds, device)
        else:
            noise = sample_noise(latents, self.settings)
            timesteps = sample_timesteps(latents.shape[0], self.settings, device)
        per_sample = diffusion_loss(
            self.unet,
            self.components.noise_scheduler,
            self.settings,
            latents=latents,
            prompt_embeds=prompt_embeds.to(device),
            pooled_prompt_embeds=pooled_prompt_embeds.to(device),
            time_ids=batch["time_ids"].to(device),
            noise=noise,
            timesteps=timesteps,
            reduction="none",
            mask=batch.get("mask"),
        )
        loss, parts = prior_weighted_loss(per_sample, batch.get("prior"), self.prior_loss_weight)
        return (loss, parts) if with_parts else loss
