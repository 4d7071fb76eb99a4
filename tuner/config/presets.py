"""Presets: YAML files in `presets/` that name settings for real hardware.

In a wheel they are packaged as `tuner/presets/`; in a source checkout they are read from the
repository's top-level `presets/` folder.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml

from tuner.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def presets_dir() -> Path:
    for candidate in (_PACKAGE_DIR / "presets", _PACKAGE_DIR.parent / "presets"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        "no presets folder found next to the tuner package",
        hint="reinstall tuner; the wheel ships tuner/presets/",
    )


def preset_names() -> list[str]:
    return sorted(path.stem for path in presets_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        names = preset_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown preset '{name}'", hint=hint + "available: " + ", ".join(names))
    return path


def preset_description(name: str) -> str:
    data = yaml.safe_load(preset_path(name).read_text(encoding="utf-8")) or {}
    return str(data.get("description", "")).strip()


def load_preset(name: str) -> dict:
    """The preset's settings as a nested dict (without its description)."""
    data = yaml.safe_load(preset_path(name).read_text(encoding="utf-8")) or {}
    data.pop("description", None)
    return data
