"""SDXL-shaped pipelines with random weights, and a captioned image folder, for benchmarks.

`full` is stabilityai/stable-diffusion-xl-base-1.0's architecture (its config values); `small` divides
every width by ~5 and keeps the block layout, the attention depth pattern (transformer_layers_per_block
[1, 2, 10]), the head width (64) and both text encoders' depths. Tokenizers and scheduler come from
the tiny SDXL model (the tokenizer only decides which ids are used, not any shape the step computes).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tuner.tiny import build_tiny
from tuner.tiny.datasets import draw_shape

SCALES = ("small", "full")
DEFAULT_RESOLUTION = {"small": 128, "full": 1024}
# SDXL base's values; `small` overrides the widths below.
_UNET_FULL = {
    "block_out_channels": (320, 640, 1280),
    "attention_head_dim": (5, 10, 20),  # diffusers' name for the head count
    "transformer_layers_per_block": (1, 2, 10),
    "addition_time_embed_dim": 256,
    "norm_num_groups": 32,
}
_UNET_SMALL = {
    **_UNET_FULL,
    "block_out_channels": (64, 128, 256),
    "attention_head_dim": (1, 2, 4),
    "addition_time_embed_dim": 64,
}
_TEXT_FULL = (
    {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "projection_dim": 1280,
    },
)
_TEXT_SMALL = (
    {"hidden_size": 160, "intermediate_size": 640, "num_hidden_layers": 12, "num_attention_heads": 4},
    {
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 32,
        "num_attention_heads": 4,
        "projection_dim": 256,
    },
)
_VAE_BLOCKS = {"small": (32, 64, 128, 128), "full": (128, 256, 512, 512)}
CLIP_VOCAB = 49408
SHAPES = ("square", "circle", "triangle")


@dataclass
class SDXLConfigs:
    text_encoder: CLIPTextConfig
    text_encoder_2: CLIPTextConfig
    unet: dict
    vae: dict


def sdxl_configs(scale: str) -> SDXLConfigs:
    """The configs of the four SDXL models at `scale` (the rest of each config from the tiny SDXL)."""
    tiny = build_tiny("sdxl")
    text_sizes = _TEXT_FULL if scale == "full" else _TEXT_SMALL
    encoders = []
    for subfolder, sizes in zip(("text_encoder", "text_encoder_2"), text_sizes, strict=True):
        config = CLIPTextConfig.from_pretrained(tiny / subfolder)
        config.update({**sizes, "vocab_size": CLIP_VOCAB})
        encoders.append(config)
    unet_sizes = _UNET_FULL if scale == "full" else _UNET_SMALL
    unet = {
        **UNet2DConditionModel.load_config(tiny / "unet"),
        **unet_sizes,
        "sample_size": DEFAULT_RESOLUTION[scale] // 8,
        "cross_attention_dim": encoders[0].hidden_size + encoders[1].hidden_size,
        "projection_class_embeddings_input_dim": 6 * unet_sizes["addition_time_embed_dim"]
        + encoders[1].projection_dim,
    }
    vae = {
        **AutoencoderKL.load_config(tiny / "vae"),
        "block_out_channels": _VAE_BLOCKS[scale],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": DEFAULT_RESOLUTION[scale],
    }
    return SDXLConfigs(encoders[0], encoders[1], unet, vae)


def build_sdxl_pipeline(scale: str, folder: Path, seed: int = 0) -> Path:
    """Write an SDXL pipeline of `scale` with random weights to `folder` (once; reused when present)."""
    done = folder / ".complete"
    if done.exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    tiny = build_tiny("sdxl")
    folder.mkdir(parents=True)
    for name in ("tokenizer", "tokenizer_2", "scheduler", "model_index.json"):
        source = tiny / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / name)
    torch.manual_seed(seed)
    # Half-precision weights at full scale keep the folder at ~7 GB; training loads them in its own dtype.
    dtype = torch.bfloat16 if scale == "full" else torch.float32
    configs = sdxl_configs(scale)
    CLIPTextModel(configs.text_encoder).to(dtype).save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(configs.text_encoder_2).to(dtype).save_pretrained(folder / "text_encoder_2")
    UNet2DConditionModel.from_config(configs.unet).to(dtype).save_pretrained(folder / "unet")
    AutoencoderKL.from_config(configs.vae).save_pretrained(folder / "vae")
    done.touch()
    return folder


def write_captioned_images(folder: Path, count: int, resolution: int, seed: int = 0) -> Path:
    """`count` square PNGs of coloured shapes with `.txt` captions beside them (kohya layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        # A colour of its own per image: a duplicate would train twice and be warned about.
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = rng.choice(SHAPES)
        draw_shape(colour, shape, resolution, resolution).save(folder / f"{index:05d}.png")
        caption = f"a {shape} in colour {colour}, plain background, sample {index}"
        (folder / f"{index:05d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def unet_parameter_count(folder: Path) -> int:
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    return sum(parameter.numel() for parameter in unet.parameters())
