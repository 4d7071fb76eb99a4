"""Module names of the original SDXL UNet (Stability's `sgm` code) <-> diffusers' `UNet2DConditionModel`.

The original UNet numbers its blocks flat: `input_blocks.0` is `conv_in`, then each down level has one
`input_blocks` entry per layer (`.0` the ResNet, `.1` the transformer when the level has attention)
and, on all but the last level, one more holding the downsampler (`.0.op`); so layer `j` of level `l`
is `input_blocks.{1 + (L+1)*l + j}` for `L` layers per block. `middle_block.0/1/2` are ResNet,
transformer, ResNet. Each up level has `L+1` `output_blocks` entries (`(L+1)*l + j`), whose last one
also carries the upsampler, at `.2` after a transformer or `.1` without one. Inside a ResNet the
original names its layers by position (`in_layers.2` is `conv1`); transformers are named alike.

The table is derived from the UNet config, so any UNet of the SDXL family (the tiny test model, SDXL
base, other depths) maps, not only one size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# diffusers' ResNet layer -> the original's position in its Sequential.
_RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


class UNetLayout:
    """Renames module (or parameter) paths between diffusers' and the original SDXL UNet naming."""

    def __init__(self, unet_config: Mapping[str, Any]) -> None:
        # prefix -> (renamed prefix, whether it is a ResNet whose inner layers are renamed too)
        self._to_original: dict[str, tuple[str, bool]] = {
            name: (original, False) for name, original in _TOP_LEVEL.items()
        }
        down_types = list(unet_config["down_block_types"])
        up_types = list(unet_config["up_block_types"])
        layers = unet_config["layers_per_block"]
        layers_per_level = [layers] * len(down_types) if isinstance(layers, int) else list(layers)
        index = 1
        for level, block_type in enumerate(down_types):
            for layer in range(layers_per_level[level]):
                self._add(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0", resnet=True)
                if "CrossAttn" in block_type:
                    self._add(f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1")
                index += 1
            if level < len(down_types) - 1:
                self._add(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op")
                index += 1
        self._add("mid_block.resnets.0", "middle_block.0", resnet=True)
        self._add("mid_block.attentions.0", "middle_block.1")
        self._add("mid_block.resnets.1", "middle_block.2", resnet=True)
        index = 0
        for level, block_type in enumerate(up_types):
            has_attention = "CrossAttn" in block_type
            # Up levels have one layer more than down levels (diffusers' reversed layers_per_block + 1).
            level_layers = layers_per_level[len(down_types) - 1 - level] + 1
            for layer in range(level_layers):
                self._add(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{index}.0", resnet=True)
                if has_attention:
                    self._add(f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{index}.1")
                if layer == level_layers - 1 and level < len(up_types) - 1:
                    position = 2 if has_attention else 1
                    self._add(
                        f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{index}.{position}.conv"
                    )
                index += 1
        self._to_diffusers = {
            original: (name, resnet) for name, (original, resnet) in self._to_original.items()
        }

    def _add(self, name: str, original: str, *, resnet: bool = False) -> None:
        self._to_original[name] = (original, resnet)

    def to_original(self, path: str) -> str:
        """`down_blocks.1.attentions.0.proj_in.weight` -> `input_blocks.4.1.proj_in.weight`."""
        return _rename(path, self._to_original, _RESNET_LAYERS)

    def to_diffusers(self, path: str) -> str:
        """The inverse of `to_original`."""
        return _rename(
            path, self._to_diffusers, {original: name for name, original in _RESNET_LAYERS.items()}
        )


def _rename(path: str, prefixes: dict[str, tuple[str, bool]], resnet_layers: dict[str, str]) -> str:
    parts = path.split(".")
    for length in range(len(parts), 0, -1):
        prefix = ".".join(parts[:length])
        if prefix not in prefixes:
            continue
        renamed, is_resnet = prefixes[prefix]
        rest = parts[length:]
        if is_resnet:
            # Inner names are one part (diffusers) or two (original): try the longer first.
            for inner_length in (2, 1):
                inner = ".".join(rest[:inner_length])
                if len(rest) >= inner_length and inner in resnet_layers:
                    rest = [resnet_layers[inner], *rest[inner_length:]]
                    break
            else:
                raise KeyError(f"{path}: unknown ResNet layer")
        return ".".join([renamed, *rest])
    raise KeyError(f"{path} has no counterpart in the other SDXL UNet layout")
