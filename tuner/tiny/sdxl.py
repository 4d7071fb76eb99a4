"""A tiny random SDXL pipeline with the real SDXL structure, saved as an ordinary diffusers folder.

Same block types, conditioning (two CLIP text encoders, `text_time` added embeddings) and scheduler
config as stabilityai/stable-diffusion-xl-base-1.0, at a width where a 64 px training step is cheap.
The UNet and text encoders are random; the VAE is set by hand to a colour codec (see `_colour_vae`), so
what an adapter learns in latent space shows in the decoded pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tuner.formats.sdxl_folder import save_sdxl_folder
from tuner.tiny.bpe import clip_style_bpe

# Bump when the saved model changes, so cached folders from an older builder are rebuilt.
BUILDER_VERSION = 5
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


# Latent channels from RGB in [-1, 1] (rows: brightness and three colour differences), scaled so that
# latents times the scaling factor are about unit size, as the scheduler's noise assumes.
_RGB_TO_LATENT = torch.tensor(
    [[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]]
) / (0.13025 * 2.0)
# Two channels held at +-_NORM_ANCHOR beside the colour: the VAE's last GroupNorm (one group) then divides
# by a near-constant, so it stays linear in the colour instead of normalising it away.
_NORM_ANCHOR = 100.0
# Shifts the colour into SiLU's near-linear range before the last convolution takes it off again.
_SILU_SHIFT = 12.0


def _colour_vae() -> AutoencoderKL:
    """An AutoencoderKL of SDXL's block types whose encoder maps each 8x8 patch's mean colour to a latent
    and whose decoder maps it back (nearest upsampling): a random tiny VAE decodes every latent to much
    the same grey, which hides anything learned. Every residual branch is zeroed, so each block passes
    its input on; conv_in/conv_out and the last norms carry the colour.
    """
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=1,
        latent_channels=4,
        sample_size=SAMPLE_SIZE * 8,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
                if module.conv_shortcut is not None:
                    _pass_channels(module.conv_shortcut, centre=0)
            elif isinstance(module, Attention):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
            elif isinstance(module, Downsample2D):
                # A 2x2 mean: the top-left taps of the stride-2 kernel, clear of the padded row and column.
                module.conv.weight.zero_()
                module.conv.bias.zero_()
                for channel in range(module.channels):
                    module.conv.weight[channel, channel, :2, :2] = 0.25
            elif isinstance(module, Upsample2D):
                _pass_channels(module.conv, centre=1)
        latent_to_rgb = torch.linalg.pinv(_RGB_TO_LATENT)
        _colour_in(vae.encoder.conv_in, torch.eye(3))
        _colour_out(vae.encoder.conv_norm_out, vae.encoder.conv_out, _RGB_TO_LATENT)
        # The log-variance half of the encoder's output: sampling the latent is as good as taking its mean.
        vae.encoder.conv_out.bias[4:] = -30.0
        _pass_channels(vae.quant_conv, centre=0)
        _pass_channels(vae.post_quant_conv, centre=0)
        _colour_in(vae.decoder.conv_in, latent_to_rgb)
        _colour_out(vae.decoder.conv_norm_out, vae.decoder.conv_out, torch.eye(3))
    return vae


def _pass_channels(conv: torch.nn.Conv2d, centre: int) -> None:
    """Channel i in -> channel i out (the first min(in, out) channels), through the kernel tap `centre`."""
    conv.weight.zero_()
    conv.bias.zero_()
    for channel in range(min(conv.in_channels, conv.out_channels)):
        conv.weight[channel, channel, centre, centre] = 1.0


def _colour_in(conv: torch.nn.Conv2d, colour: torch.Tensor) -> None:
    """Channels 0-2: `colour` @ input, 3-5 their negatives (so the colour adds nothing to the norm's mean),
    6-7 the +-anchor; the rest zero."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.kernel_size[0] // 2
    conv.weight[0:3, :, centre, centre] = colour
    conv.weight[3:6, :, centre, centre] = -colour
    conv.bias[6] = _NORM_ANCHOR
    conv.bias[7] = -_NORM_ANCHOR


def _colour_out(norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d, colour: torch.Tensor) -> None:
    """Undo the norm's division on channels 0-2, shift them past SiLU's bend, then `colour` @ them."""
    # The anchors dominate the one group's variance: its std is about anchor * sqrt(2 / channels).
    norm.weight.zero_()
    norm.weight[0:3] = _NORM_ANCHOR * (2.0 / norm.num_channels) ** 0.5
    norm.bias.zero_()
    norm.bias[0:3] = _SILU_SHIFT
    conv.weight.zero_()
    centre = conv.kernel_size[0] // 2
    rows = colour.shape[0]
    conv.weight[:rows, 0:3, centre, centre] = colour
    conv.bias.zero_()
    conv.bias[:rows] = -_SILU_SHIFT * colour.sum(dim=1)


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
    vae = _colour_vae()
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
