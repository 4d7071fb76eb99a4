"""A diffusers SDXL pipeline -> one `.safetensors` checkpoint in the original (Stability `sgm`) layout.

That is the file A1111/Forge, ComfyUI and diffusers' `from_single_file` load: the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.`, CLIP-L under
`conditioner.embedders.0.transformer.` (transformers' own names) and the OpenCLIP bigG encoder under
`conditioner.embedders.1.model.` in OpenCLIP's layout, where q/k/v are one fused `in_proj` and the text
projection is stored transposed (OpenCLIP multiplies `x @ text_projection`). The way back is diffusers'
`StableDiffusionXLPipeline.from_single_file`, which `tuner.models.sdxl.load_sdxl` uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from tuner.formats.sdxl_unet_layout import UNetLayout

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."

_VAE_RESNET_LAYERS = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_LAYERS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_NAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
}
_CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
_OPENCLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def sdxl_original_state_dict(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
) -> dict[str, torch.Tensor]:
    """Every weight of the pipeline under its original single-file name."""
    layout = UNetLayout(unet.config)
    checkpoint = {UNET_PREFIX + layout.to_original(key): value for key, value in unet.state_dict().items()}
    checkpoint |= {VAE_PREFIX + key: value for key, value in vae_to_original(vae).items()}
    checkpoint |= {
        TEXT_ENCODER_PREFIX + key: value
        for key, value in clip_state_dict(text_encoder).items()
        if not key.endswith("position_ids")
    }
    checkpoint |= {
        TEXT_ENCODER_2_PREFIX + key: value for key, value in open_clip_state_dict(text_encoder_2).items()
    }
    return checkpoint


def save_sdxl_single_file(
    path: Path,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
    metadata: dict[str, str] | None = None,
) -> Path:
    checkpoint = sdxl_original_state_dict(unet, vae, text_encoder, text_encoder_2)
    save_file({key: value.contiguous() for key, value in checkpoint.items()}, str(path), metadata=metadata)
    return Path(path)


def vae_to_original(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`AutoencoderKL` weights under the original names (`encoder.down.0.block.1`, `mid.attn_1`)."""
    return dict(vae_original_tensors(vae.state_dict().items(), len(vae.config.up_block_types)))


def vae_original_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], up_levels: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """`AutoencoderKL` weights (diffusers names) under their original names, one at a time; `up_levels` is
    the number of the decoder's up blocks (`len(config.up_block_types)`), which the original counts down."""
    for key, value in tensors:
        parts = key.split(".")
        coder = parts[0]
        if parts[1:2] == ["conv_norm_out"]:
            parts[1] = "norm_out"
        elif parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2])
            original_level = level if parts[1] == "down_blocks" else up_levels - 1 - level
            head = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                parts = [
                    coder,
                    head,
                    str(original_level),
                    "block",
                    parts[4],
                    *_renamed(parts[5:], _VAE_RESNET_LAYERS),
                ]
            else:  # downsamplers.0.conv / upsamplers.0.conv
                sampler = "downsample" if head == "down" else "upsample"
                parts = [coder, head, str(original_level), sampler, *parts[5:]]
        elif parts[1] == "mid_block":
            index = int(parts[3])
            if parts[2] == "resnets":
                parts = [coder, "mid", f"block_{index + 1}", *_renamed(parts[4:], _VAE_RESNET_LAYERS)]
            else:
                parts = [coder, "mid", "attn_1", *_renamed(parts[4:], _VAE_ATTENTION_LAYERS)]
                # The original attention projects with 1x1 convolutions, diffusers' with Linear layers.
                if parts[-1] == "weight" and value.ndim == 2:
                    value = value[:, :, None, None]
        yield ".".join(parts), value


def open_clip_state_dict(text_encoder_2: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`CLIPTextModelWithProjection` weights in OpenCLIP's layout (fused q/k/v, transposed projection)."""
    return dict(open_clip_tensors(clip_tensors(text_encoder_2.state_dict().items())))


def open_clip_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """`CLIPTextModelWithProjection` weights (transformers 4 names, see `clip_tensors`) in OpenCLIP's
    layout, one at a time: a layer's q, k and v projections are held until all three have come, then
    fused into its `in_proj`. Buffers that are no weights (`position_ids`) are left out."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors:
        if key in _OPENCLIP_NAMES:
            yield _OPENCLIP_NAMES[key], value.T if key == "text_projection.weight" else value
            continue
        match = _CLIP_LAYER.fullmatch(key)
        if match is None:
            continue
        layer, part, kind = match.groups()
        target = f"transformer.resblocks.{layer}."
        projection = _QKV.get(part)
        if projection is None:
            yield f"{target}{_OPENCLIP_LAYER_PARTS[part]}.{kind}", value
            continue
        name = f"{target}attn.in_proj_{kind}"
        group = pending.setdefault(name, {})
        group[projection] = value
        if len(group) == len(_QKV):
            yield name, torch.cat([group[letter] for letter in "qkv"])
            del pending[name]
    if pending:
        raise ValueError(f"q, k and v projections incomplete for {', '.join(sorted(pending))}")


def clip_state_dict(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's weights named as in transformers 4 (`text_model.encoder...`)."""
    return dict(clip_tensors(text_encoder.state_dict().items()))


def clip_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """CLIP text-encoder weights named as in transformers 4 (`text_model.encoder...`), one at a time.

    transformers 5 dropped the `text_model` wrapper from `CLIPTextModel` (its keys start at
    `embeddings.`), while checkpoints in the wild, and diffusers' single-file loader, expect it.
    """
    for key, value in tensors:
        yield (key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"), value


def _renamed(parts: list[str], names: dict[str, str]) -> list[str]:
    for length in (2, 1):
        head = ".".join(parts[:length])
        if len(parts) > length and head in names:
            return [names[head], *parts[length:]]
    return parts
