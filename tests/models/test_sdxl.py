"""SDXL model pieces against diffusers as the oracle: prompt encoding, time ids, latents, the loss, and
adapters that a plain diffusers pipeline loads at the strength they were trained at."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.training_utils import compute_snr
from PIL import Image

from tuner.errors import ConfigError, ModelError
from tuner.models.sdxl import compute_time_ids, encode_latents, encode_prompt, load_sdxl
from tuner.models.sdxl_lora import (
    TEXT_ENCODER_TARGETS,
    add_lora,
    lora_config,
    read_adapter_metadata,
    save_sdxl_lora,
    unet_target_modules,
)
from tuner.models.sdxl_loss import (
    SDXLLoraModel,
    diffusion_loss,
    min_snr_weights,
    noise_settings,
    sample_noise,
    sample_timesteps,
)
from tuner.models.sdxl_sampling import encode_sample_prompts, sample_images

CAPTIONS = ["a red cube on a table", "", "tag one, tag two, " * 30]


@pytest.fixture(scope="module")
def sdxl_path(tiny_model) -> Path:
    return tiny_model("sdxl")


@pytest.fixture(scope="module")
def pipeline(sdxl_path: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def components(sdxl_path: Path):
    return load_sdxl(str(sdxl_path))


def test_components_load_frozen_with_a_ddpm_noise_scheduler(components) -> None:
    for module in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        assert not any(parameter.requires_grad for parameter in module.parameters())
    assert type(components.noise_scheduler).__name__ == "DDPMScheduler"


def test_vae_stays_fp32_when_the_rest_loads_in_half_precision(sdxl_path: Path) -> None:
    half = load_sdxl(str(sdxl_path), weight_dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.text_encoder_2.dtype == torch.bfloat16
    assert half.vae.dtype == torch.float32
    assert load_sdxl(str(sdxl_path), weight_dtype=torch.bfloat16, vae_half_precision_safe=True).vae.dtype == (
        torch.bfloat16
    )


def test_pickle_only_model_is_refused_with_the_allow_pickle_hint(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelError) as raised:
        load_sdxl(str(tmp_path))
    assert "unet" in raised.value.message and "--allow-pickle" in raised.value.hint


def test_encode_prompt_equals_the_pipeline(components, pipeline) -> None:
    with torch.no_grad():
        ours, ours_pooled = encode_prompt(components, CAPTIONS, "cpu")
        theirs, _, theirs_pooled, _ = pipeline.encode_prompt(
            CAPTIONS, device="cpu", do_classifier_free_guidance=False
        )
    hidden = components.text_encoder.config.hidden_size + components.text_encoder_2.config.hidden_size
    assert ours.shape == (len(CAPTIONS), 77, hidden)
    assert ours_pooled.shape == (len(CAPTIONS), components.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_pooled, theirs_pooled, atol=1e-5, rtol=0)
    # The empty caption is the encoded text "", not the zeros the pipeline uses for an empty negative.
    assert ours[1].abs().sum() > 0


def test_time_ids_equal_the_pipeline(pipeline) -> None:
    original, crop, target = (1024, 768), (32, 0), (896, 1152)
    expected = pipeline._get_add_time_ids(
        original, crop, target, dtype=torch.float32, text_encoder_projection_dim=32
    )
    torch.testing.assert_close(compute_time_ids(original, crop, target), expected[0], atol=0, rtol=0)


def test_encode_latents_is_the_scaled_posterior_mean(components, pipeline) -> None:
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = encode_latents(components, pixels)
        expected = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
    assert latents.shape == (2, 4, 8, 6)
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_equals_a_reference_written_with_diffusers_calls(components, pipeline, prediction_type) -> None:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([17, 903])
    captions = ["a cat", "a dog"]
    settings = noise_settings(components.noise_scheduler, prediction_type=prediction_type, snr_gamma=5.0)
    with torch.no_grad():
        prompt_embeds, pooled = encode_prompt(components, captions, "cpu")
        time_ids = torch.stack([compute_time_ids((64, 64), (0, 0), (64, 64))] * 2)
        ours = diffusion_loss(
            components.unet,
            components.noise_scheduler,
            settings,
            latents=latents,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            time_ids=time_ids,
            noise=noise,
            timesteps=timesteps,
        )

        # The reference: the pipeline's own encodings, the closed-form forward process, diffusers'
        # compute_snr and the min-SNR weighting of its training examples.
        ref_embeds, _, ref_pooled, _ = pipeline.encode_prompt(
            captions, device="cpu", do_classifier_free_guidance=False
        )
        ref_time_ids = pipeline._get_add_time_ids(
            (64, 64), (0, 0), (64, 64), dtype=torch.float32, text_encoder_projection_dim=32
        ).repeat(2, 1)
        alpha_bar = pipeline.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        if prediction_type == "epsilon":
            target = noise
        else:
            target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
        prediction = pipeline.unet(
            noisy,
            timesteps,
            encoder_hidden_states=ref_embeds,
            added_cond_kwargs={"text_embeds": ref_pooled, "time_ids": ref_time_ids},
        ).sample
        snr = compute_snr(components.noise_scheduler, timesteps)
        weights = torch.minimum(snr, torch.full_like(snr, 5.0))
        weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
        reference = (((prediction - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_min_snr_weights_stay_finite_at_zero_terminal_snr() -> None:
    snr = torch.tensor([0.0, 1.0, 10.0])
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.5]))
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.0, 0.5, 5 / 11]))


def test_timestep_range_is_checked_and_respected(components) -> None:
    with pytest.raises(ConfigError):
        noise_settings(components.noise_scheduler, timestep_min=500, timestep_max=500)
    with pytest.raises(ConfigError):
        noise_settings(components.noise_scheduler, timestep_max=1001)
    settings = noise_settings(components.noise_scheduler, timestep_min=200, timestep_max=300)
    timesteps = sample_timesteps(4000, settings, "cpu", torch.Generator().manual_seed(0))
    assert timesteps.min() == 200 and timesteps.max() == 299


def test_noise_offset_shifts_channels_and_pyramid_noise_is_smooth_with_unit_variance(components) -> None:
    latents = torch.zeros(64, 4, 32, 32)
    plain = sample_noise(
        latents, noise_settings(components.noise_scheduler), torch.Generator().manual_seed(0)
    )
    offset = sample_noise(
        latents,
        noise_settings(components.noise_scheduler, noise_offset=0.5),
        torch.Generator().manual_seed(0),
    )
    pyramid = sample_noise(
        latents,
        noise_settings(components.noise_scheduler, pyramid_noise_discount=0.8),
        torch.Generator().manual_seed(0),
    )
    channel_means = offset.mean(dim=(2, 3))
    assert channel_means.std() > 5 * plain.mean(dim=(2, 3)).std()
    assert abs(pyramid.std().item() - 1.0) < 1e-3

    def neighbour_correlation(noise: torch.Tensor) -> float:
        return torch.corrcoef(torch.stack([noise[..., 1:].flatten(), noise[..., :-1].flatten()]))[0, 1].item()

    assert neighbour_correlation(plain) < 0.05 < 0.3 < neighbour_correlation(pyramid)


def test_target_sets_select_modules_and_reject_unknown_names(sdxl_path: Path) -> None:
    assert unet_target_modules([]) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert unet_target_modules(["attention+ffn"]) == unet_target_modules(["attention", "ffn"])
    with pytest.raises(ConfigError) as raised:
        unet_target_modules(["attention+mlp"])
    assert "mlp" in raised.value.message
    with pytest.raises(ConfigError):
        lora_config(["to_q"], rank=4, alpha=4, init="pissa")
    # LoKr/LoHa have no LoRA dropout, initialisation choice or rsLoRA: a set one is refused, not dropped.
    with pytest.raises(ConfigError, match=r"lora\.dropout"):
        lora_config(["to_q"], rank=4, alpha=4, variant="lokr", dropout=0.1)
    assert lora_config(["to_q"], rank=4, alpha=2, variant="loha").peft_type == "LOHA"
    unet = load_sdxl(str(sdxl_path)).unet
    add_lora(unet, lora_config(unet_target_modules(["attention+ffn+conv"]), rank=2, alpha=2))
    adapted = {name.rsplit(".", 1)[-1] for name, module in unet.named_modules() if hasattr(module, "lora_A")}
    assert {"to_q", "2", "proj", "conv1", "conv2", "conv_shortcut", "time_emb_proj"} <= adapted
    assert not hasattr(unet.conv_in, "lora_A") and not hasattr(unet.conv_out, "lora_A")


def _fixed_batch(components) -> dict:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        prompt_embeds, pooled = encode_prompt(components, ["a red cube", "a blue ball"], "cpu")
    return {
        "latents": torch.randn(2, 4, 8, 8, generator=generator),
        "prompt_embeds": prompt_embeds,
        "pooled_prompt_embeds": pooled,
        "time_ids": torch.stack([compute_time_ids((64, 64), (0, 0), (64, 64))] * 2),
    }


def test_overfitting_one_batch_drives_the_loss_down_and_changes_only_lora_weights(sdxl_path: Path) -> None:
    torch.manual_seed(0)
    components = load_sdxl(str(sdxl_path))
    before = {name: tensor.clone() for name, tensor in components.unet.state_dict().items()}
    # The tiny UNet's random frozen features leave attention-only LoRA little room; conv LoRA has plenty.
    targets = unet_target_modules(["attention+ffn+conv"])
    parameters = add_lora(components.unet, lora_config(targets, rank=8, alpha=8))
    model = SDXLLoraModel(
        components, noise_settings(components.noise_scheduler), encodes_images=False, encodes_captions=False
    )
    batch = _fixed_batch(components)
    optimizer = torch.optim.AdamW(parameters, lr=2e-2)
    losses = []
    for _ in range(20):
        torch.manual_seed(0)  # the same noise and timesteps every step: one (input, target) pair
        loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3
    after = components.unet.state_dict()
    lora_names = [name for name in after if "lora_" in name]
    assert lora_names and all(
        not torch.equal(after[name], torch.zeros_like(after[name])) for name in lora_names
    )
    for name, tensor in before.items():
        # PEFT moves a wrapped layer's weight to `<layer>.base_layer.weight`.
        wrapped = name.rsplit(".", 1)[0] + ".base_layer." + name.rsplit(".", 1)[1]
        assert torch.equal(after.get(name, after.get(wrapped)), tensor), name


def _randomise_lora(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in module.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3


def _generate(pipe: StableDiffusionXLPipeline) -> np.ndarray:
    return pipe(
        "a red cube",
        num_inference_steps=4,
        width=64,
        height=64,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_saved_adapter_loads_in_plain_diffusers_at_the_trained_strength(
    sdxl_path: Path, tmp_path: Path
) -> None:
    components = load_sdxl(str(sdxl_path))
    # alpha != rank: diffusers must read the scale from the saved LoRA config, not assume alpha == rank.
    add_lora(components.unet, lora_config(unet_target_modules(["attention+ffn+conv"]), rank=4, alpha=2))
    for encoder in (components.text_encoder, components.text_encoder_2):
        add_lora(encoder, lora_config(TEXT_ENCODER_TARGETS, rank=2, alpha=8))
        _randomise_lora(encoder, 2)
    _randomise_lora(components.unet, 1)
    path = save_sdxl_lora(
        tmp_path,
        components.unet,
        components.text_encoder,
        components.text_encoder_2,
        training_metadata={"base_model": str(sdxl_path), "rank": 4},
    )
    assert path == tmp_path / "pytorch_lora_weights.safetensors"
    header = read_adapter_metadata(path)
    assert header["tuner.base_model"] == str(sdxl_path) and header["tuner.rank"] == "4"
    assert header["lora_adapter_metadata"]["unet.lora_alpha"] == 2

    ours = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=components.unet,
        scheduler=StableDiffusionXLPipeline.from_pretrained(sdxl_path).scheduler,
    )
    ours.set_progress_bar_config(disable=True)
    with torch.no_grad():
        trained = _generate(ours)
        plain = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
        plain.set_progress_bar_config(disable=True)
        base = _generate(plain)
        plain.load_lora_weights(tmp_path)
        loaded = _generate(plain)
        plain.fuse_lora()
        fused = _generate(plain)
    assert np.abs(loaded - base).max() > 1e-2
    # The tiny VAE is a colour codec (tuner/tiny/sdxl.py), so latent rounding reaches the pixels: 1e-4 is
    # fp32 rounding (one 8-bit level is 4e-3), the adapter's effect is above 1e-2.
    np.testing.assert_allclose(loaded, trained, atol=1e-4, rtol=0)
    # Fusing folds B @ A into the weights: the same maths in another order, so fp32 rounding only.
    np.testing.assert_allclose(fused, loaded, atol=1e-4, rtol=0)


def test_sample_images_writes_a_prompt_by_seed_grid(components, tmp_path: Path) -> None:
    out = sample_images(
        components,
        ["a cat", "a dog"],
        [0, 1, 2],
        2,
        (64, 48),
        tmp_path / "samples" / "step-000010.png",
        device="cpu",
    )
    grid = Image.open(out)
    assert grid.size == (3 * 64, 2 * 48)
    array = np.asarray(grid)
    assert not np.array_equal(array[:48, :64], array[:48, 64:128])


def test_samples_from_encoded_prompts_without_text_encoders_equal_samples_from_text(
    components, tmp_path: Path
) -> None:
    arguments = ([0], 2, (64, 48))
    from_text = sample_images(components, ["a cat", "a dog"], *arguments, tmp_path / "text.png", device="cpu")
    encoded = encode_sample_prompts(components, ["a cat", "a dog"], "cpu")
    released = dataclasses.replace(components, text_encoder=None, text_encoder_2=None)
    from_embeddings = sample_images(released, encoded, *arguments, tmp_path / "embeds.png", device="cpu")
    np.testing.assert_array_equal(np.asarray(Image.open(from_text)), np.asarray(Image.open(from_embeddings)))


def test_cached_and_uncached_batches_give_the_same_loss(components, tmp_path: Path) -> None:
    from tuner.data.buckets import plan_crop
    from tuner.data.captions import scan_caption_dataset
    from tuner.models.sdxl_cache import build_sdxl_dataset, collate_sdxl, model_fingerprint

    for index, (width, height) in enumerate([(80, 64), (64, 64)]):
        gradient = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype(np.uint8)
        Image.fromarray(np.roll(gradient, index * 7, axis=1)).save(tmp_path / f"{index}.png")
        (tmp_path / f"{index}.txt").write_text(f"picture number {index}", encoding="utf-8")
    samples = scan_caption_dataset(tmp_path).samples
    plans = [plan_crop(80, 64, (64, 64)), plan_crop(64, 64, (64, 64))]
    options = {
        "caption_options": {"prefix": "tok"},
        "background": (255, 255, 255),
        "max_image_pixels": 10**6,
        "random_flip": False,
        "seed": 0,
        "device": "cpu",
        "accelerator": None,
    }
    fingerprint = model_fingerprint("tiny", components)
    batches = [
        collate_sdxl(
            list(
                build_sdxl_dataset(
                    samples,
                    plans,
                    components,
                    cache=cache,
                    cache_dir=tmp_path / "cache",
                    model_fingerprint=fingerprint,
                    **options,
                )
            )
        )
        for cache in (True, False)
    ]
    assert "latents" in batches[0] and "pixel_values" in batches[1]
    settings = noise_settings(components.noise_scheduler)
    losses = []
    for batch, cached in zip(batches, (True, False), strict=True):
        model = SDXLLoraModel(components, settings, encodes_images=not cached, encodes_captions=not cached)
        torch.manual_seed(5)
        with torch.no_grad():
            losses.append(model(batch))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
