#!/usr/bin/env bash
# Train a LoRA on the tiny built-in SDXL model and a generated dataset, on the CPU, in about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export TUNER_TINY_DIR="${TUNER_TINY_DIR:-$PWD/.cache/tiny}"
export HF_HUB_OFFLINE=1
OUT="${1:-outputs/demo-sdxl}"

.venv/bin/tuner env
.venv/bin/tuner train sdxl-lora --preset tiny-cpu --output "$OUT" --overwrite

echo
echo "adapter:      $OUT/pytorch_lora_weights.safetensors"
echo "sample grid:  $(ls "$OUT"/samples/*.png | tail -1)"
echo "loss curve:   $OUT/loss.png"
echo "config:       $OUT/tuner_config.yaml (pass it back with --config to reproduce the run)"
