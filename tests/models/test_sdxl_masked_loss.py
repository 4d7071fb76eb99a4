"""Masked loss on SDXL: the loss weighs each latent by its mask, normalised by the mask's area; masks go
through their image's crop and flip, are cached with the latents and re-encode when edited."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from tuner.data.buckets import plan_crop
from tuner.data.captions import CaptionedImage
from tuner.data.sampling import SampleKey
from tuner.models.sdxl_cache import build_sdxl_dataset, collate_sdxl
from tuner.models.sdxl_loss import SDXLLoraModel, diffusion_loss, noise_settings

LATENT = (2, 4, 8, 8)


class FixedPrediction(torch.nn.Module):
    """Stands in for the UNet: its prediction is a leaf tensor, so the loss's gradient on it is readable."""

    def __init__(self, prediction: torch.Tensor) -> None:
        super().__init__()
        self.prediction = torch.nn.Parameter(prediction)
        self.dtype = torch.float32

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor]:
        return (self.prediction,)


def loss_of(unet: FixedPrediction, mask: torch.Tensor | None, snr_gamma: float | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    scheduler = DDPMScheduler()
    return diffusion_loss(
        unet,
        scheduler,
        noise_settings(scheduler, snr_gamma=snr_gamma),
        latents=torch.randn(LATENT, generator=generator),
        prompt_embeds=torch.zeros(2, 1, 1),
        pooled_prompt_embeds=torch.zeros(2, 1),
        time_ids=torch.zeros(2, 6),
        noise=torch.randn(LATENT, generator=generator),
        timesteps=torch.tensor([10, 500]),
        mask=mask,
    )


def prediction() -> torch.Tensor:
    return torch.randn(LATENT, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_a_mask_of_ones_is_exactly_no_mask(snr_gamma: float | None) -> None:
    plain, ones = FixedPrediction(prediction()), FixedPrediction(prediction())
    plain_loss, ones_loss = loss_of(plain, None, snr_gamma), loss_of(ones, torch.ones(2, 1, 8, 8), snr_gamma)
    assert torch.equal(plain_loss, ones_loss)
    plain_loss.backward()
    ones_loss.backward()
    assert torch.equal(plain.prediction.grad, ones.prediction.grad)


def test_a_half_mask_gives_no_gradient_from_the_black_half() -> None:
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1  # left half white (trained), right half black (ignored)
    unet = FixedPrediction(prediction())
    loss = loss_of(unet, mask)
    loss.backward()
    grad = unet.prediction.grad
    assert torch.count_nonzero(grad[..., 4:]) == 0
    assert torch.count_nonzero(grad[..., :4]) == grad[..., :4].numel()

    # Normalised by the mask's area: the loss is the plain mean error over the white half, not half of it.
    generator = torch.Generator().manual_seed(1)
    torch.randn(LATENT, generator=generator)
    noise = torch.randn(LATENT, generator=generator)  # epsilon target
    torch.testing.assert_close(loss, F.mse_loss(unet.prediction[..., :4], noise[..., :4]))


def test_grey_weighs_between() -> None:
    weights = torch.full((2, 1, 8, 8), 0.25)
    weights[..., :4] = 1.0
    unet = FixedPrediction(prediction())
    loss = loss_of(unet, weights)
    loss.backward()

    generator = torch.Generator().manual_seed(1)
    torch.randn(LATENT, generator=generator)
    noise = torch.randn(LATENT, generator=generator)
    error = unet.prediction.detach() - noise
    # Per sample: the weighted squared error over the weighted area (channels included); then the batch mean.
    expected = ((weights * error**2).sum(dim=(1, 2, 3)) / (weights.sum(dim=(1, 2, 3)) * 4)).mean()
    torch.testing.assert_close(loss, expected)
    # Each latent's gradient is proportional to its weight: a 0.25 grey pulls a quarter as hard.
    pull = unet.prediction.grad / error
    torch.testing.assert_close(
        pull[..., 4:], 0.25 * pull[..., :4].mean(dim=-1, keepdim=True).expand(-1, -1, -1, 4)
    )


# --- masks through the dataset: crop, flip, cache --------------------------------------------------------


def asymmetric(size: tuple[int, int]) -> np.ndarray:
    """A grey picture with a bright block in its top-left corner and a ramp: no flip or shift maps it
    onto itself."""
    width, height = size
    pixels = np.tile(np.linspace(0, 120, width, dtype=np.float32), (height, 1))
    pixels[: height // 3, : width // 4] = 255
    return pixels.astype(np.uint8)


@pytest.fixture
def masked_sample(tmp_path: Path) -> CaptionedImage:
    """An image whose grey content IS its mask, so where the image's pixels go the mask must go too."""
    folder = tmp_path / "data"
    (folder / "masks").mkdir(parents=True)
    grey = asymmetric((120, 80))
    Image.fromarray(grey, "L").convert("RGB").save(folder / "a.png")
    Image.fromarray(grey, "L").save(folder / "masks" / "a.png")
    return CaptionedImage(
        image=folder / "a.png", caption="a", source="a.txt", mask=folder / "masks" / "a.png"
    )


def build(
    sample, plan, components, *, cache: bool, cache_dir: Path, fingerprint: str = "", masked_loss: bool = True
):
    return build_sdxl_dataset(
        [sample],
        [plan],
        components,
        cache=cache,
        cache_dir=cache_dir,
        model_fingerprint=fingerprint,
        caption_options={},
        background=(255, 255, 255),
        max_image_pixels=10**6,
        random_flip=True,
        seed=3,
        device=torch.device("cpu"),
        masked_loss=masked_loss,
    )


def items_by_flip(dataset) -> list[dict]:
    """One item drawn unflipped and one flipped (the flip is drawn per epoch: two distinct pictures)."""
    first = dataset[SampleKey(0, 0)]
    for epoch in range(1, 64):
        item = dataset[SampleKey(0, epoch)]
        if not torch.equal(item["pixel_values"], first["pixel_values"]):
            return [first, item]
    raise AssertionError("no epoch drew the other orientation")


def test_the_mask_follows_its_image_through_crop_and_flip(masked_sample, components, tmp_path: Path) -> None:
    # 120x80 -> resized to 96x64 and cropped at a random left offset to the 64x64 bucket.
    plan = plan_crop(120, 80, (64, 64), center=False, rng=random.Random(5))
    assert plan.resized == (96, 64) and plan.crop_top_left[1] not in (0, 16, 32)
    dataset = build(masked_sample, plan, components, cache=False, cache_dir=tmp_path / "unused")
    masks = []
    for item in items_by_flip(dataset):
        grey = (item["pixel_values"][0] + 1) / 2  # the image's grey in [0, 1] after resize, crop, flip
        expected = F.interpolate(grey[None, None], size=(8, 8), mode="area")[0]
        assert item["mask"].shape == (1, 8, 8)
        torch.testing.assert_close(item["mask"], expected, atol=1 / 255, rtol=0)
        masks.append(item["mask"])
    assert not torch.allclose(masks[0], masks[1])  # the flip changed the mask


def test_cached_masks_equal_uncached_ones_and_batch_as_b1hw(
    masked_sample, components, fingerprint, tmp_path: Path
) -> None:
    plan = plan_crop(120, 80, (64, 64), center=False, rng=random.Random(5))
    uncached = build(masked_sample, plan, components, cache=False, cache_dir=tmp_path / "unused")
    cached = build(
        masked_sample, plan, components, cache=True, cache_dir=tmp_path / "cache", fingerprint=fingerprint
    )
    for epoch in range(6):
        key = SampleKey(0, epoch)
        assert torch.equal(cached[key]["mask"], uncached[key]["mask"])
    assert collate_sdxl([cached[0], cached[0]])["mask"].shape == (2, 1, 8, 8)


def test_editing_a_mask_re_encodes_its_entry(masked_sample, components, fingerprint, tmp_path: Path) -> None:
    plan = plan_crop(120, 80, (64, 64))
    before = build(
        masked_sample, plan, components, cache=True, cache_dir=tmp_path / "cache", fingerprint=fingerprint
    )
    Image.new("L", (120, 80), 255).save(masked_sample.mask)
    after = build(
        masked_sample, plan, components, cache=True, cache_dir=tmp_path / "cache", fingerprint=fingerprint
    )
    assert before._cached[0].latents != after._cached[0].latents
    assert torch.equal(after[0]["mask"], torch.ones(1, 8, 8))
    assert not torch.equal(before[0]["mask"], after[0]["mask"])
    # The image itself did not change: only the entries' keys (and masks) differ.
    assert torch.equal(before[0]["latents"], after[0]["latents"])


def test_an_image_without_a_mask_trains_everywhere_and_shares_the_unmasked_entry(
    masked_sample, components, fingerprint, tmp_path: Path
) -> None:
    plain = CaptionedImage(image=masked_sample.image, caption="a", source="a.txt")
    plan = plan_crop(120, 80, (64, 64))
    masked = build(plain, plan, components, cache=True, cache_dir=tmp_path / "cache", fingerprint=fingerprint)
    unmasked = build(
        plain,
        plan,
        components,
        cache=True,
        cache_dir=tmp_path / "cache",
        fingerprint=fingerprint,
        masked_loss=False,
    )
    assert torch.equal(masked[0]["mask"], torch.ones(1, 8, 8))
    assert "mask" not in unmasked[0]
    assert masked._cached[0].latents == unmasked._cached[0].latents


def test_the_model_weighs_a_batch_by_its_mask(components) -> None:
    model = SDXLLoraModel(
        components, noise_settings(components.noise_scheduler), encodes_images=True, encodes_captions=True
    )
    batch = {
        "pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1,
        "caption": ["a", "b"],
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        "sample_seed": torch.tensor([1, 2]),
    }
    half = torch.zeros(2, 1, 8, 8)
    half[..., :4] = 1
    with torch.no_grad():
        plain = model(batch)
        ones = model({**batch, "mask": torch.ones(2, 1, 8, 8)})
        masked = model({**batch, "mask": half})
    assert torch.equal(plain, ones)
    assert not torch.equal(plain, masked)
