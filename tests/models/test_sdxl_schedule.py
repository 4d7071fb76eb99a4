"""SDXL prediction type and noise schedule as users' checkpoints carry them (issue #27): the `v_pred` /
`ztsnr` marker keys of single-file checkpoints, zero-terminal-SNR betas, and the Huber losses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from sdxl_checkpoints import marked_checkpoint

from tuner.errors import ConfigError
from tuner.models.sdxl import compute_time_ids, encode_prompt, load_sdxl
from tuner.models.sdxl_loss import (
    choose_schedule,
    diffusion_loss,
    elementwise_loss,
    huber_deltas,
    noise_settings,
    training_scheduler,
)
from tuner.models.sdxl_sampling import build_pipeline


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_model) -> Path:
    return tiny_model("sdxl")


@pytest.mark.parametrize(
    ("markers", "prediction_type", "zero_terminal_snr"),
    [
        (("v_pred", "ztsnr"), "v_prediction", True),
        (("v_pred",), "v_prediction", False),
        # ComfyUI reads `ztsnr` only beside `v_pred`.
        (("ztsnr",), "epsilon", False),
        ((), "epsilon", False),
    ],
)
def test_marker_keys_set_the_schedule_as_comfyui_reads_them(
    tiny_sdxl: Path, tmp_path: Path, markers, prediction_type, zero_terminal_snr
) -> None:
    checkpoint = marked_checkpoint(tiny_sdxl, tmp_path / "model.safetensors", markers)
    components = load_sdxl(str(checkpoint), single_file_config=str(tiny_sdxl))
    assert components.noise_scheduler.config.prediction_type == prediction_type
    assert components.noise_scheduler.config.rescale_betas_zero_snr is zero_terminal_snr

    schedule = choose_schedule(components.noise_scheduler, components.schedule_markers)
    assert (schedule.prediction_type, schedule.zero_terminal_snr) == (prediction_type, zero_terminal_snr)
    line = schedule.describe()
    if "v_pred" in markers:
        assert "v_prediction (from the checkpoint's v_pred key)" in line
    else:
        assert "(from the model's scheduler config)" in line
    if zero_terminal_snr:
        assert "zero terminal SNR (rescaled betas) (from the checkpoint's ztsnr key)" in line


def test_config_overrides_the_markers_and_says_so(tiny_sdxl: Path, tmp_path: Path) -> None:
    checkpoint = marked_checkpoint(tiny_sdxl, tmp_path / "model.safetensors", ("v_pred", "ztsnr"))
    components = load_sdxl(str(checkpoint), single_file_config=str(tiny_sdxl))
    schedule = choose_schedule(
        components.noise_scheduler, components.schedule_markers, zero_terminal_snr=False
    )
    assert schedule.prediction_type == "v_prediction" and not schedule.zero_terminal_snr
    assert "the model's betas (from train.zero_terminal_snr)" in schedule.describe()
    # An epsilon target on zero terminal SNR is refused, whichever side asked for which.
    with pytest.raises(ConfigError, match="epsilon target"):
        choose_schedule(components.noise_scheduler, components.schedule_markers, prediction_type="epsilon")


def test_zero_terminal_snr_betas_are_diffusers_rescale_and_the_last_step_is_pure_noise() -> None:
    base = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = choose_schedule(base, prediction_type="v_prediction", zero_terminal_snr=True)
    scheduler = training_scheduler(base, schedule)
    expected = torch.cumprod(1.0 - rescale_zero_terminal_snr(base.betas.clone()), dim=0)
    torch.testing.assert_close(scheduler.alphas_cumprod, expected)
    assert scheduler.alphas_cumprod[-1] == 0 and base.alphas_cumprod[-1] > 0.004
    # The first timestep keeps SDXL's signal level, as the rescaling promises.
    torch.testing.assert_close(scheduler.alphas_cumprod[0], base.alphas_cumprod[0])

    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    last = torch.tensor([999, 999])
    torch.testing.assert_close(scheduler.add_noise(latents, noise, last), noise)
    # The v target at the last step is the negated clean latent: the model must predict the image.
    torch.testing.assert_close(scheduler.get_velocity(latents, noise, last), -latents)


def test_samplers_follow_the_zero_terminal_snr_schedule_from_the_last_timestep(tiny_sdxl: Path) -> None:
    components = load_sdxl(str(tiny_sdxl))
    schedule = choose_schedule(
        components.noise_scheduler, prediction_type="v_prediction", zero_terminal_snr=True
    )
    components.noise_scheduler = training_scheduler(components.noise_scheduler, schedule)
    scheduler = build_pipeline(components).scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr
    scheduler.set_timesteps(4)
    assert scheduler.timesteps[0] == 999
    # What `tuner infer` passes from an adapter's header wins over the base model's scheduler.
    plain = build_pipeline(load_sdxl(str(tiny_sdxl)), "v_prediction", True).scheduler
    assert plain.config.rescale_betas_zero_snr and plain.config.timestep_spacing == "trailing"


def _pseudo_huber_reference(prediction, target, delta, loss_type):
    # The formulas of kohya's sd-scripts (library/train_util.py, conditional_loss), element by element.
    residual = float(prediction) - float(target)
    smooth = 2 * (math.sqrt(residual**2 + delta**2) - delta)
    return delta * smooth if loss_type == "huber" else smooth


@pytest.mark.parametrize("loss", ["huber", "smooth_l1"])
def test_pseudo_huber_losses_match_kohyas_formulas(loss: str) -> None:
    prediction, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2) * 3
    deltas = torch.tensor([0.1, 0.5, 1.0])
    values = elementwise_loss(prediction, target, loss, deltas)
    for index in [(0, 0, 0, 0), (1, 2, 1, 0), (2, 3, 1, 1)]:
        expected = _pseudo_huber_reference(prediction[index], target[index], deltas[index[0]].item(), loss)
        assert values[index].item() == pytest.approx(expected, rel=1e-5)
    # Huber is the squared error for small residuals and linear (2c|r|) for large ones.
    exact = torch.float64  # float32 loses the small difference of the square root to cancellation
    small = elementwise_loss(
        torch.tensor([[1e-3]], dtype=exact), torch.tensor([[0.0]], dtype=exact), "huber", torch.tensor([0.5])
    )
    assert small.item() == pytest.approx(1e-6, rel=1e-3)
    large = elementwise_loss(torch.tensor([[100.0]]), torch.tensor([[0.0]]), "huber", torch.tensor([0.1]))
    assert large.item() == pytest.approx(2 * 0.1 * 100, rel=1e-2)


def test_huber_delta_schedules_are_kohyas() -> None:
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0, 500, 999])
    c = 0.1

    def deltas(schedule: str) -> list[float]:
        settings = noise_settings(scheduler, loss="huber", huber_c=c, huber_schedule=schedule)
        return huber_deltas(scheduler, settings, timesteps).tolist()

    assert deltas("constant") == pytest.approx([c, c, c])
    alpha = -math.log(c) / 1000
    assert deltas("exponential") == pytest.approx([math.exp(-alpha * t) for t in (0, 500, 999)], rel=1e-5)
    expected = []
    for t in (0, 500, 999):
        alpha_bar = scheduler.alphas_cumprod[t].item()
        sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
        expected.append((1 - c) / (1 + sigma) ** 2 + c)
    assert deltas("snr") == pytest.approx(expected, rel=1e-5)
    # Huber settings without a Huber loss would act on nothing.
    with pytest.raises(ConfigError, match=r"train\.loss is mse"):
        noise_settings(scheduler, huber_c=0.3)


def test_the_huber_loss_reaches_the_unet_loss(components) -> None:
    settings = {name: noise_settings(components.noise_scheduler, loss=name) for name in ("mse", "huber")}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        prompt_embeds, pooled = encode_prompt(components, ["a red cube", "a blue ball"], "cpu")
    inputs = {
        "latents": torch.randn(2, 4, 8, 8, generator=generator),
        "prompt_embeds": prompt_embeds,
        "pooled_prompt_embeds": pooled,
        "time_ids": torch.stack([compute_time_ids((64, 64), (0, 0), (64, 64))] * 2),
        "noise": torch.randn(2, 4, 8, 8, generator=generator),
        "timesteps": torch.tensor([10, 900]),
    }
    with torch.no_grad():
        mse, huber = (
            diffusion_loss(
                components.unet, components.noise_scheduler, settings[name], **inputs, reduction="none"
            )
            for name in ("mse", "huber")
        )
    # Pseudo-Huber lies below the squared error everywhere (equal only at a zero residual).
    assert torch.all(huber < mse)
