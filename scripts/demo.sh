#!/usr/bin/env bash
# First a Qwen-VL LoRA on the tiny built-in model: answers to held-out pictures before and after, `tuner eval`
# scores and both models' answers side by side, a loss logged at every step and report.html. Then an SDXL
# LoRA on the tiny SDXL and a generated dataset, generated with (beside the base model) and merged into the
# base. All on the CPU, after the first setup (times and scores: README.md, "Demo").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export TUNER_TINY_DIR="${TUNER_TINY_DIR:-$PWD/.cache/tiny}"
export HF_HUB_OFFLINE=1
OUT="${1:-outputs/demo-sdxl}"
VL="${2:-outputs/demo-qwenvl}"

.venv/bin/tuner env
# Qwen-VL: the same question ("What is in the picture?") for every picture, 4 colours x 3 shapes drawn at
# random places and sizes; eval data `tiny` is a new picture of each of the 12 (other places and sizes),
# scored every 10 steps during training (eval/* in metrics.jsonl and the report) and afterwards for the
# base model and the adapter side by side. Only the picture tells the answer.
.venv/bin/tuner train qwenvl-lora --preset tiny-cpu --output "$VL" --overwrite --lr 1e-2 --rank 8 --alpha 16 \
    --max-steps 40 --checkpoint-every 20 --set output.eval_data=tiny --set output.eval_every=10 \
    --set output.keep_best=eval/rouge_l --set output.log_every=1
.venv/bin/tuner eval qwenvl --data tiny --adapter "$VL" --out "$VL/eval" --max-new-tokens 12 --device cpu
.venv/bin/tuner report "$VL"

# SDXL: 20 steps, the loss logged at every step (the tiny random UNet's loss only wanders, and the tiny
# random VAE draws much the same picture for any latent: this part shows the pipeline, not learning).
.venv/bin/tuner train sdxl-lora --preset tiny-cpu --output "$OUT" --overwrite --max-steps 20 \
    --set output.log_every=1
.venv/bin/tuner infer sdxl --model tiny --adapter "$OUT" --prompt "a red square" --steps 4 --size 64x64 \
    --num-images 2 --compare --device cpu --out "$OUT/infer"
rm -rf "$OUT/merged"
.venv/bin/tuner merge --base tiny --adapter "$OUT" --output "$OUT/merged"
.venv/bin/tuner report "$OUT"

echo
echo "Qwen-VL adapter: $VL/ (answers before/after and scores: $VL/eval/eval.json, the table above)"
echo "run report:      $VL/report.html (loss curve, eval scores, sample answers, config; open it in a browser)"
echo "adapter:      $OUT/pytorch_lora_weights.safetensors"
echo "sample grid:  $(ls "$OUT"/samples/*.png | tail -1)"
echo "loss curve:   $OUT/loss.png"
echo "images:       $OUT/infer/ (seed-*.png, grid.png; compare.png: base row above, adapter row below)"
echo "merged model: $OUT/merged/ (a diffusers folder with the LoRA fused in)"
echo "config:       $OUT/tuner_config.yaml (pass it back with --config to reproduce the run)"
