#!/usr/bin/env bash
# Set up everything from nothing (venv, install, tiny models on first use) and run the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k config -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export TUNER_TINY_DIR="${TUNER_TINY_DIR:-$PWD/.cache/tiny}"
export HF_HUB_OFFLINE=1
.venv/bin/ruff check tuner tests scripts
.venv/bin/hadolint --failure-threshold warning Dockerfile.ascend Dockerfile.cuda
.venv/bin/python -m pytest -q -ra --durations=15 "$@"
