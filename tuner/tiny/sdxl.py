"""A tiny random SDXL pipeline with the real SDXL structure, saved as an ordinary diffusers folder.

Same block types, conditioning (two CLIP text encoders, `text_time` added embeddings) and scheduler
config as stabilityai/stable-diffusion-xl-base-1.0, at a width where a 64 px training step is cheap.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tuner.formats.sdxl_folder import save_sdxl_folder
from tuner.tiny.bpe import clip_style_bpe

# Bump when the saved model changes, so cached folders from an older builder are rebuilt.
BUILDER_VERSION = 3
SEED = 0

TEXT_ENCODER_HIDDEN = 32
# Wider than the first encoder, as in SDXL (768 vs 1280): single-file loaders tell them apart by width.
TEXT_ENCODER_2_HIDDEN = 48
TEXT_ENCODER_2_PROJECTION = 32
ADDITION_TIME_EMBED_DIM = 8
# One 64 px image is 8x8 latents after the VAE's three 2x downsamplings.
SAMPLE_SIZE = 8


def _tokenizer(pad_token: str) -> CLIPTokenizer:
    vocab, merges = clip_style_bpe(num_merges=120)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def _text_encoder_config(tokenizer: CLIPTokenizer, hidden_size: int, **extra: object) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build(folder: Path) -> None:
    """Write a tiny SDXL pipeline into `folder` (reproducible: fixed seed)."""
    torch.manual_seed(SEED)
    # As in SDXL base: the first tokenizer pads with <|endoftext|>, the second with "!".
    tokenizer = _tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = _tokenizer(pad_token="!")
    text_encoder = CLIPTextModel(
        _text_encoder_config(tokenizer, TEXT_ENCODER_HIDDEN, hidden_act="quick_gelu")
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_encoder_config(
            tokenizer_2, TEXT_ENCODER_2_HIDDEN, hidden_act="gelu", projection_dim=TEXT_ENCODER_2_PROJECTION
        )
    )
    unet = UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        norm_num_groups=8,
        # diffusers' naming quirk kept from SDXL: this is the number of heads per block.
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=[1, 1, 2],
        use_linear_projection=True,
        cross_attention_dim=TEXT_ENCODER_HIDDEN + TEXT_ENCODER_2_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        # Six time ids (original size, crop origin, target size), each embedded, plus the pooled
        # projection of the second text encoder.
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_ENCODER_2_PROJECTION,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=SAMPLE_SIZE * 8,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=False,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    # The published SDXL layout (CLIP-L under `text_model.`), which ComfyUI's text-encoder loading reads.
    save_sdxl_folder(pipeline, folder)
