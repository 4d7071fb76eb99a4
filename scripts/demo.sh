#!/usr/bin/env bash
# Train a LoRA on the tiny built-in SDXL model and a generated dataset on the CPU, then generate with it
# (side by side with the base model) and merge it into the base: about two minutes in all.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export TUNER_TINY_DIR="${TUNER_TINY_DIR:-$PWD/.cache/tiny}"
export HF_HUB_OFFLINE=1
OUT="${1:-outputs/demo-sdxl}"

.venv/bin/tuner env
.venv/bin/tuner train sdxl-lora --preset tiny-cpu --output "$OUT" --overwrite
.venv/bin/tuner infer sdxl --model tiny --adapter "$OUT" --prompt "a red square" --steps 4 --size 64x64 \
    --num-images 2 --compare --device cpu --out "$OUT/infer"
rm -rf "$OUT/merged"
.venv/bin/tuner merge --base tiny --adapter "$OUT" --output "$OUT/merged"

echo
echo "adapter:      $OUT/pytorch_lora_weights.safetensors"
echo "sample grid:  $(ls "$OUT"/samples/*.png | tail -1)"
echo "loss curve:   $OUT/loss.png"
echo "images:       $OUT/infer/ (seed-*.png, grid.png; compare.png: base row above, adapter row below)"
echo "merged model: $OUT/merged/ (a diffusers folder with the LoRA fused in)"
echo "config:       $OUT/tuner_config.yaml (pass it back with --config to reproduce the run)"
