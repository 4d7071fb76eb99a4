"""Presets: YAML files in `presets/` that name settings for real hardware.

In a wheel they are packaged as `tuner/presets/`; in a source checkout they are read from the
repository's top-level `presets/` folder.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import get_args

import yaml

from tuner.config.schema import Task
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


def load_preset(name: str, task: str | None = None) -> dict:
    """The preset's settings for `task` as a nested dict (without its description).

    A preset for several tasks puts what only one task reads under a top-level key named after it
    (`sdxl-lora:`, `qwenvl-lora:`), since each recipe refuses the keys it does not use (see
    `tuner.config.keys`). Those sections are merged over the shared settings for `task`; with no task
    (`tuner presets show`), all of them are.
    """
    data = yaml.safe_load(preset_path(name).read_text(encoding="utf-8")) or {}
    data.pop("description", None)
    sections = {task_name: data.pop(task_name) for task_name in get_args(Task) if task_name in data}
    for task_name, section in sections.items():
        if task is None or task_name == task:
            data = _merged(data, section)
    return data


def _merged(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_sections else value
    return merged
