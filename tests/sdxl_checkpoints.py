"""Single-file SDXL checkpoints as users have them, made from the tiny SDXL."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from tuner.formats.sdxl_single_file import sdxl_original_state_dict


def marked_checkpoint(folder: Path, out: Path, markers: tuple[str, ...]) -> Path:
    """The SDXL folder as one single-file checkpoint with the given empty marker tensors, as ComfyUI saves
    a v-prediction model (`v_pred`) and NoobAI-XL V-Pred ships (`v_pred` and `ztsnr`)."""
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    checkpoint = sdxl_original_state_dict(
        pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2
    )
    checkpoint |= {marker: torch.tensor([]) for marker in markers}
    save_file({key: value.contiguous() for key, value in checkpoint.items()}, str(out))
    return out
