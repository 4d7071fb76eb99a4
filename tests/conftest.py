"""Shared fixtures. Tests never touch the network: the hub is forced offline for the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
# scripts/test.sh points this at a folder that survives between runs, so tiny models are built once.
TINY_DIR = Path(os.environ.setdefault("TUNER_TINY_DIR", str(REPO_ROOT / ".cache" / "tiny")))


@pytest.fixture(scope="session")
def tiny_model():
    """`tiny_model("sdxl" | "qwen2-vl" | "qwen2.5-vl" | "qwen3-vl") -> Path` of a saved tiny model."""
    from tuner.tiny import build_tiny

    return lambda name: build_tiny(name, root=TINY_DIR)
