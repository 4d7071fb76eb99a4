#!/usr/bin/env bash
# Create a venv and install tuner with its dev tools.
#   scripts/setup.sh            .venv: exactly the tested set in requirements-lock.txt. Idempotent: a
#                               second run with the same pyproject.toml and lock does nothing.
#   scripts/setup.sh --latest   .venv-latest: the newest releases the index offers, ignoring the lock and
#                               pyproject's upper bounds (torch still paired with its torchvision), to
#                               find a breaking release on purpose; prints which packages moved.
# Needs only the package registries and a Python that pyproject.toml's requires-python admits (>= 3.11:
# what the locked set needs); PYTHON=python3.12 picks another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
LOCK=requirements-lock.txt
LATEST=0
[ "${1:-}" = "--latest" ] && LATEST=1
if [ "$LATEST" = 1 ]; then VENV=.venv-latest; else VENV=.venv; fi
STAMP="$VENV/.tuner-installed"
WANT="$(cat pyproject.toml "$LOCK" | sha256sum | cut -c1-16)"

# Refuse an older Python in one line, before pip fails on the first locked package it lacks.
NEEDED="$(sed -n 's/^requires-python = ">=\([0-9.]*\)".*/\1/p' pyproject.toml)"
INTERPRETER="$PYTHON"
FIX="run it with PYTHON=python$NEEDED or newer"
if [ -x "$VENV/bin/python" ]; then
    INTERPRETER="$VENV/bin/python"
    FIX="remove $VENV and $FIX"
fi
HAVE="$("$INTERPRETER" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
if [ -z "$HAVE" ] || [ "$(printf '%s\n' "$NEEDED" "$HAVE" | sort -V | head -n1)" != "$NEEDED" ]; then
    echo "setup: tuner needs Python >= $NEEDED (requires-python), $INTERPRETER is ${HAVE:-not runnable}: $FIX" >&2
    exit 2
fi

if [ "$LATEST" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
    && "$VENV/bin/python" -c "import tuner" 2>/dev/null; then
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
if [ "$LATEST" = 0 ]; then
    echo "setup: installing the locked set ($LOCK) into $VENV (about 2 minutes the first time)..."
    "${PIP[@]}" -c "$LOCK" pip
    # torch and torchvision first, as the locked pair: transformers 5.x's Qwen-VL processors need a
    # torchvision built for the installed torch.
    "${PIP[@]}" -c "$LOCK" torch torchvision
    "${PIP[@]}" -c "$LOCK" -e ".[dev]"
    # A venv made from an older lock may hold packages the new one dropped.
    EXTRAS="$("$VENV/bin/python" scripts/lock_diff.py "$LOCK" --extras)"
    if [ -n "$EXTRAS" ]; then
        echo "setup: removing packages the lock does not name: $EXTRAS"
        # shellcheck disable=SC2086
        "$VENV/bin/python" -m pip uninstall -q -y $EXTRAS
    fi
    "$VENV/bin/python" scripts/lock_diff.py "$LOCK" --strict
    echo "$WANT" > "$STAMP"
else
    # The same torch/torchvision pair as the lock: the newest torch pip may install here (see
    # docs/development.md), and torchvision must be built for it.
    PAIR=$(grep -E '^(torch|torchvision)==' "$LOCK" | tr '\n' ' ')
    echo "setup: installing the newest releases into $VENV (torch pair: $PAIR)..."
    "${PIP[@]}" --upgrade pip
    # shellcheck disable=SC2086
    "${PIP[@]}" $PAIR
    "${PIP[@]}" --no-deps -e .
    # Every requirement by name only, so pyproject's upper bounds do not hold the newest release back.
    NAMES="$("$VENV/bin/python" scripts/lock_diff.py --requirement-names)"
    # shellcheck disable=SC2086
    "${PIP[@]}" --upgrade $NAMES $PAIR
    "$VENV/bin/python" scripts/lock_diff.py "$LOCK" || true
fi
echo "setup: done"
