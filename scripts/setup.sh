#!/usr/bin/env bash
# Create .venv and install tuner with its dev tools. Idempotent: a second run with the same
# pyproject.toml does nothing. Needs only Python >= 3.10 and the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.tuner-installed"
WANT="$(sha256sum pyproject.toml | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import tuner" 2>/dev/null; then
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "setup: installing tuner and its dependencies into $VENV (about 2 minutes the first time)..."
"$VENV/bin/python" -m pip install -q --upgrade pip
# transformers 5.x's Qwen-VL processors need torchvision, and torchvision must match torch exactly:
# install the pair first, pinned together (an unpinned peft/accelerate would pull another torch).
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e ".[dev]" "torch==2.14.1" "torchvision==0.29.1"
echo "$WANT" > "$STAMP"
echo "setup: done"
