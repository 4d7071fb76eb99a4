"""Step 1 of the ComfyUI check (project venv): a random-weight SDXL, tuner's default outputs for it, and
what ComfyUI's patched weights should be.

Writes into WORK:
  sdxl-<scale>/                    the diffusers folder (tuner.bench.sdxl_shapes, random weights)
  adapter/                         tuner's SDXL outputs: pytorch_lora_weights.safetensors (diffusers) and
                                   pytorch_lora_weights_kohya.safetensors, UNet (attention, ffn, conv) and
                                   both text encoders, as training with `lora.text_encoder: true` saves them
  reference.safetensors            per ComfyUI weight key: the LoRA's `down`, `up` and alpha/rank, read
                                   from the diffusers file and named through tuner's UNet layout table,
                                   not through the kohya names under test

Usage: .venv/bin/python scripts/interop/sdxl_outputs.py WORK [--scale full|small]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tuner.bench.sdxl_shapes import build_sdxl_pipeline
from tuner.formats.kohya import export_kohya
from tuner.formats.sdxl_unet_layout import UNetLayout
from tuner.models.sdxl import load_sdxl
from tuner.models.sdxl_lora import (
    KOHYA_ADAPTER_FILE,
    TEXT_ENCODER_TARGETS,
    add_lora,
    lora_config,
    save_sdxl_lora,
    unet_target_modules,
)

RANK, ALPHA = 4, 3.0
# ComfyUI's names for the weights of its SDXL model and its two CLIP models.
COMFY_PREFIXES = {
    "unet": "diffusion_model.",
    "text_encoder": "clip_l.transformer.",
    "text_encoder_2": "clip_g.transformer.",
}
# diffusers 0.42 writes `.lora_A/.lora_B` for the UNet and `.lora_linear_layer.down/up` for text encoders.
_MATRIX = re.compile(
    r"^(?P<component>[a-z_0-9]+)\.(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora\.down|lora\.up|"
    r"lora_linear_layer\.down|lora_linear_layer\.up)\.weight$"
)


def write_adapter(folder: Path, output: Path) -> Path:
    components = load_sdxl(str(folder), weight_dtype=torch.bfloat16)
    torch.manual_seed(0)
    add_lora(
        components.unet, lora_config(unet_target_modules(["attention+ffn+conv"]), rank=RANK, alpha=ALPHA)
    )
    for encoder in (components.text_encoder, components.text_encoder_2):
        add_lora(encoder, lora_config(TEXT_ENCODER_TARGETS, rank=RANK, alpha=ALPHA))
    with torch.no_grad():
        for model in (components.unet, components.text_encoder, components.text_encoder_2):
            for name, parameter in model.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero: a zero delta would prove nothing
                    parameter.normal_(std=0.02)
    adapter_file = save_sdxl_lora(
        output,
        components.unet,
        components.text_encoder,
        components.text_encoder_2,
        training_metadata={"base_model": str(folder), "rank": RANK, "alpha": ALPHA},
    )
    # What training writes by default beside the diffusers file (tuner.recipes.sdxl).
    export_kohya(adapter_file, output / KOHYA_ADAPTER_FILE, dict(components.unet.config), title=output.name)
    return adapter_file


def write_reference(adapter_file: Path, unet_config: dict, output: Path) -> int:
    layout = UNetLayout(unet_config)
    matrices: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(adapter_file), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
            match = _MATRIX.match(key)
            if match is None:
                raise SystemExit(f"unexpected key in {adapter_file}: {key}")
            component, module = match["component"], match["module"]
            if component == "unet":
                name = layout.to_original(module)
            else:  # ComfyUI's CLIP models keep the `text_model.` level transformers 5 drops for CLIP-L
                name = module if module.startswith("text_model.") else f"text_model.{module}"
            kind = "down" if match["kind"] in ("lora_A", "lora.down", "lora_linear_layer.down") else "up"
            matrices.setdefault(f"{COMFY_PREFIXES[component]}{name}.weight", {})[kind] = handle.get_tensor(
                key
            )
    tensors = {}
    for key, pair in matrices.items():
        tensors[f"{key}.down"] = pair["down"].float().contiguous()
        tensors[f"{key}.up"] = pair["up"].float().contiguous()
        tensors[f"{key}.scale"] = torch.tensor(ALPHA / pair["down"].shape[0])
    save_file(tensors, str(output))
    return len(matrices)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work", type=Path)
    parser.add_argument("--scale", choices=("full", "small"), default="full")
    args = parser.parse_args()
    folder = build_sdxl_pipeline(args.scale, args.work / f"sdxl-{args.scale}")
    adapter_file = write_adapter(folder, args.work / "adapter")
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    count = write_reference(adapter_file, unet_config, args.work / "reference.safetensors")
    print(f"base {folder}; adapter {adapter_file.parent}; {count} adapted weights in the reference")


if __name__ == "__main__":
    main()
