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
# Qwen-VL: the same question ("What is in the picture?") for every picture, 4 colours x 3 shapes drawn
# large near the centre (8 renders of each, other sizes and offsets); eval data `tiny` is a new render of
# each of the 12, scored every 100 steps during training (eval/* in metrics.jsonl and the report) and
# afterwards for the base model and the adapter side by side. Only the picture tells the answer. The
# vision tower and merger are adapted too (they carry the picture), at a lower lr than the LLM; one CPU
# thread, because on a busy 2-core machine a second thread mostly spins.
.venv/bin/tuner train qwenvl-lora --preset tiny-cpu --output "$VL" --overwrite --batch-size 8 \
    --targets llm,vision,merger --lr 5e-3 --set lora.lr_vision=2e-3 --set lora.lr_merger=2e-3 \
    --rank 8 --alpha 16 --set optim.scheduler=cosine --max-steps 300 --checkpoint-every 100 \
    --set output.eval_data=tiny --set output.eval_every=100 --set output.keep_best=eval/exact_match \
    --set output.log_every=1 --set runtime.num_threads=1
OMP_NUM_THREADS=1 .venv/bin/tuner eval qwenvl --data tiny --adapter "$VL" --out "$VL/eval" --max-new-tokens 20 \
    --device cpu
.venv/bin/tuner report "$VL"

# SDXL: a trigger word. `tiny-trigger` is four pictures of one colour (RGB 200,40,160) captioned around the
# made-up word "zxq"; the random base draws noise-coloured blocks for it. v-prediction, because at high noise
# the UNet's output is then the picture itself, which a LoRA learns in a few steps (the tiny UNet never
# learns to predict the noise in so few). The same seeds without and with the adapter: compare.png (also
# in the report) and the mean distance of their pixels to the trained colour.
.venv/bin/tuner train sdxl-lora --preset tiny-cpu --output "$OUT" --overwrite --max-steps 30 --lr 1e-2 \
    --set data.path=tiny-trigger --set train.prediction_type=v_prediction --set output.log_every=1 \
    --set 'output.sample_prompts=["zxq"]'
rm -rf "$OUT/base"
.venv/bin/tuner infer sdxl --model tiny --prompt zxq --steps 4 --size 64x64 --num-images 4 --device cpu \
    --out "$OUT/base"
.venv/bin/tuner infer sdxl --model tiny --adapter "$OUT" --prompt zxq --steps 4 --size 64x64 \
    --num-images 4 --compare --device cpu --out "$OUT/infer"
.venv/bin/python - "$OUT" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tuner.tiny.datasets import TRIGGER_COLOUR

for name in ("base", "infer"):
    pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB"), float).reshape(-1, 3)
                             for p in sorted((Path(sys.argv[1]) / name).glob("seed-*.png"))])
    distance = np.linalg.norm(pixels - np.array(TRIGGER_COLOUR, float), axis=1).mean()
    print(f"zxq samples, {'base' if name == 'base' else 'adapter'}: mean RGB distance to {TRIGGER_COLOUR} "
          f"{distance:.1f}")
PY
rm -rf "$OUT/merged"
.venv/bin/tuner merge --base tiny --adapter "$OUT" --output "$OUT/merged"
.venv/bin/tuner report "$OUT"

echo
echo "Qwen-VL adapter: $VL/ (answers before/after and scores: $VL/eval/eval.json, the table above)"
echo "run report:      $VL/report.html (loss curve, eval scores, sample answers, config; open it in a browser)"
echo "adapter:      $OUT/pytorch_lora_weights.safetensors"
echo "sample grid:  $(ls "$OUT"/samples/*.png | tail -1)"
echo "loss curve:   $OUT/loss.png"
echo "images:       $OUT/infer/ (seed-*.png, grid.png; compare.png: base row above, adapter row below), $OUT/base/"
echo "merged model: $OUT/merged/ (a diffusers folder with the LoRA fused in)"
echo "config:       $OUT/tuner_config.yaml (pass it back with --config to reproduce the run)"
