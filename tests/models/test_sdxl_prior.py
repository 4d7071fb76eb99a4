"""The prior-preservation loss: class (prior) samples weighted by data.prior_loss_weight inside the batch
mean, their flag carried from CaptionedImage to the batch, and the instance/prior parts reported apart."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from tuner.data.buckets import plan_crop
from tuner.data.captions import CaptionedImage
from tuner.models.sdxl import compute_time_ids, encode_prompt, load_sdxl
from tuner.models.sdxl_cache import build_sdxl_dataset, collate_sdxl
from tuner.models.sdxl_lora import add_lora, lora_config, unet_target_modules
from tuner.models.sdxl_loss import (
    SDXLLoraModel,
    diffusion_loss,
    noise_settings,
    prior_weighted_loss,
    seeded_noise_and_timesteps,
)

BATCH = 4


@pytest.fixture(scope="module")
def components(tiny_model):
    components = load_sdxl(str(tiny_model("sdxl")))
    add_lora(components.unet, lora_config(unet_target_modules(["attention+ffn+conv"]), rank=4, alpha=4))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in components.unet.named_parameters():
        if "lora_" in name:  # non-zero B, so every LoRA weight gets a gradient
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    return components


@pytest.fixture(scope="module")
def batch(components) -> dict:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        prompt_embeds, pooled = encode_prompt(components, [f"a shape {i}" for i in range(BATCH)], "cpu")
    return {
        "latents": torch.randn(BATCH, 4, 8, 8, generator=generator),
        "prompt_embeds": prompt_embeds,
        "pooled_prompt_embeds": pooled,
        "time_ids": torch.stack([compute_time_ids((64, 64), (0, 0), (64, 64))] * BATCH),
        "sample_seed": torch.arange(BATCH) + 100,  # noise and timesteps from each sample's own seed
    }


def _model(components, prior_loss_weight: float = 1.0) -> SDXLLoraModel:
    settings = noise_settings(components.noise_scheduler, snr_gamma=5.0)
    return SDXLLoraModel(
        components,
        settings,
        encodes_images=False,
        encodes_captions=False,
        prior_loss_weight=prior_loss_weight,
    )


def _reference_loss(model: SDXLLoraModel, batch: dict, reduction: str = "none") -> torch.Tensor:
    """The loss (each sample's, or with "mean" the batch's) by the functions that computed the whole
    loss before prior preservation."""
    noise, timesteps = seeded_noise_and_timesteps(
        batch["latents"], model.settings, batch["sample_seed"], "cpu"
    )
    return diffusion_loss(
        model.unet,
        model.components.noise_scheduler,
        model.settings,
        latents=batch["latents"],
        prompt_embeds=batch["prompt_embeds"],
        pooled_prompt_embeds=batch["pooled_prompt_embeds"],
        time_ids=batch["time_ids"],
        noise=noise,
        timesteps=timesteps,
        reduction=reduction,
    )


def _lora_gradients(model: SDXLLoraModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.unet.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.unet.named_parameters() if p.requires_grad}


def test_a_batch_without_class_images_computes_todays_loss_bit_for_bit(components, batch) -> None:
    model = _model(components, prior_loss_weight=0.3)
    today = _reference_loss(model, batch, reduction="mean")
    expected_gradients = _lora_gradients(model, today)
    for with_flags in (False, True):
        flagged = {**batch, "prior": torch.zeros(BATCH, dtype=torch.bool)} if with_flags else batch
        loss = model(flagged)
        assert torch.equal(loss, today)
        gradients = _lora_gradients(model, loss)
        assert all(torch.equal(gradients[name], grad) for name, grad in expected_gradients.items())


def test_prior_loss_weight_zero_leaves_class_images_no_gradient_but_logs_their_loss(
    components, batch
) -> None:
    model = _model(components, prior_loss_weight=0.0)
    prior = torch.tensor([False, True, False, True])
    loss, parts = model({**batch, "prior": prior}, with_parts=True)
    per_sample = _reference_loss(model, batch).detach()
    torch.testing.assert_close(loss, per_sample[~prior].sum() / BATCH, rtol=1e-6, atol=0)
    # The prior part is the class images' loss as it is, not times the weight 0.
    assert parts["prior"][1].item() == 2 and parts["instance"][1].item() == 2
    torch.testing.assert_close(parts["prior"][0], per_sample[prior].sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(parts["instance"][0], per_sample[~prior].sum(), rtol=1e-6, atol=0)
    assert parts["prior"][0].item() > 0

    # Class images alone at weight 0: not one LoRA weight receives a gradient from them.
    only_prior = _lora_gradients(model, model({**batch, "prior": torch.ones(BATCH, dtype=torch.bool)}))
    assert all(torch.count_nonzero(gradient) == 0 for gradient in only_prior.values())


def test_prior_loss_weight_scales_class_images_exactly(components, batch) -> None:
    all_prior = {**batch, "prior": torch.ones(BATCH, dtype=torch.bool)}
    unweighted = _lora_gradients(_model(components, 1.0), _model(components, 1.0)(all_prior))
    weighted = _lora_gradients(_model(components, 0.25), _model(components, 0.25)(all_prior))
    for name, gradient in unweighted.items():
        assert torch.equal(weighted[name], gradient * 0.25), name  # a power of two scales exactly

    model = _model(components, prior_loss_weight=1.7)
    prior = torch.tensor([True, False, False, False])
    per_sample = _reference_loss(model, batch).detach()
    mixed = model({**batch, "prior": prior})
    expected = (per_sample[0] * 1.7 + per_sample[1:].sum()) / BATCH
    torch.testing.assert_close(mixed.detach(), expected, rtol=1e-6, atol=0)


def test_the_parts_sum_and_count_each_kind_of_sample() -> None:
    per_sample = torch.tensor([1.0, 2.0, 4.0, 8.0], requires_grad=True)
    loss, parts = prior_weighted_loss(per_sample, torch.tensor([False, True, True, False]), 0.5)
    assert loss.item() == (1.0 + 8.0 + 0.5 * (2.0 + 4.0)) / 4
    assert [(total.item(), count.item()) for total, count in parts.values()] == [(9.0, 2), (6.0, 2)]
    assert list(parts) == ["instance", "prior"] and not parts["prior"][0].requires_grad


@pytest.mark.parametrize("cache", [True, False])
def test_the_prior_flag_reaches_the_batch(tiny_model, tmp_path: Path, cache: bool) -> None:
    components = load_sdxl(str(tiny_model("sdxl")))
    samples = []
    for index, prior in enumerate((False, True, False)):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (64, 64), (40 * index, 90, 200)).save(path)
        sample = CaptionedImage(image=path, caption=f"image {index}", source=str(path))
        samples.append(dataclasses.replace(sample, prior=prior))
    plans = [plan_crop(64, 64, (64, 64), center=True) for _ in samples]
    dataset = build_sdxl_dataset(
        samples,
        plans,
        components,
        cache=cache,
        cache_dir=tmp_path / "cache",
        model_fingerprint="f" * 64 if cache else "",
        caption_options={},
        background=(255, 255, 255),
        max_image_pixels=10**7,
        random_flip=False,
        seed=0,
        device=torch.device("cpu"),
    )
    batch = collate_sdxl([dataset[index] for index in range(len(samples))])
    assert batch["prior"].dtype == torch.bool
    assert batch["prior"].tolist() == [False, True, False]
