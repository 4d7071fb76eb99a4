"""Fixtures shared by the model tests: the tiny SDXL, loaded once per module."""

from __future__ import annotations

import pytest

from tuner.models.sdxl import load_sdxl
from tuner.models.sdxl_cache import model_fingerprint


@pytest.fixture(scope="module")
def components(tiny_model):
    """The tiny SDXL's components (a module that needs LoRA in them overrides this fixture)."""
    return load_sdxl(str(tiny_model("sdxl")))


@pytest.fixture(scope="module")
def fingerprint(components) -> str:
    return model_fingerprint("tiny", components)
