"""Tiny SDXL LoRA files with non-zero weights and alpha != rank, so a wrong scale or name shows."""

from __future__ import annotations

from pathlib import Path

import torch

from tuner.models.sdxl import load_sdxl
from tuner.models.sdxl_lora import (
    TEXT_ENCODER_TARGETS,
    add_lora,
    lora_config,
    save_sdxl_lora,
    unet_target_modules,
)


def write_adapter(
    model_folder: Path,
    output_dir: Path,
    *,
    seed: int = 0,
    targets: str = "attention+ffn",
    rank: int = 4,
    alpha: float = 3.0,
    text_encoder: bool = False,
    base_model: str = "tiny-sdxl",
    variant: str = "lora",
    prediction_type: str | None = None,
) -> Path:
    """An adapter injected by tuner's own code, B (DoRA's magnitudes, LoKr/LoHa factors) randomized, saved
    as training saves it."""
    torch.manual_seed(seed)
    components = load_sdxl(str(model_folder))
    options = {"rank": rank, "alpha": alpha, "variant": variant}
    add_lora(components.unet, lora_config(unet_target_modules([targets]), **options))
    models = [components.unet]
    if text_encoder:
        for encoder in (components.text_encoder, components.text_encoder_2):
            add_lora(encoder, lora_config(TEXT_ENCODER_TARGETS, **options))
            models.append(encoder)
    with torch.no_grad():
        for model in models:
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.3)
                elif "lora_magnitude_vector" in name:
                    parameter.mul_(1.0 + 0.5 * torch.rand_like(parameter))
                elif "lokr_" in name or "hada_" in name:  # LoKr/LoHa start with one factor at zero
                    parameter.normal_(std=0.3)
    return save_sdxl_lora(
        output_dir,
        components.unet,
        components.text_encoder if text_encoder else None,
        components.text_encoder_2 if text_encoder else None,
        training_metadata={
            "base_model": base_model,
            "rank": rank,
            "alpha": alpha,
            "variant": variant,
            # What training records; `tuner infer`/`eval` sample the adapter for it.
            **({"prediction_type": prediction_type} if prediction_type else {}),
        },
    )
