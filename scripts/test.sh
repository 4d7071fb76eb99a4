#!/usr/bin/env bash
# Set up everything from nothing (venv with the locked set, tiny models on first use) and run the whole
# suite. Extra arguments go to pytest, e.g. scripts/test.sh -k config -x
#   scripts/test.sh --latest [PYTEST ARGS]   the same suite in .venv-latest, on the newest releases
#                                            (not part of CI; see docs/development.md)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
TINY="$PWD/.cache/tiny"
if [ "${1:-}" = "--latest" ]; then
    shift
    scripts/setup.sh --latest
    VENV=.venv-latest
    TINY="$PWD/.cache/tiny-latest"
    # The suite should meet the new releases themselves, not tuner's refusal of known-broken ones.
    export TUNER_IGNORE_KNOWN_BREAKS=1
else
    scripts/setup.sh
fi
export TUNER_TINY_DIR="${TUNER_TINY_DIR:-$TINY}"
export HF_HUB_OFFLINE=1
"$VENV/bin/ruff" check tuner tests scripts
"$VENV/bin/hadolint" --failure-threshold warning Dockerfile.ascend Dockerfile.cuda
status=0
"$VENV/bin/python" -m pytest -q -ra --durations=15 "$@" || status=$?
if [ "$VENV" = .venv-latest ]; then
    echo "--latest: packages that moved from requirements-lock.txt (locked -> newest):"
    "$VENV/bin/python" scripts/lock_diff.py requirements-lock.txt || true
    "$VENV/bin/tuner" env | grep "library stack" || true
fi
exit "$status"
