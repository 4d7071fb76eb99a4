"""Tiny random SDXL and Qwen-VL models with the real structure, for tests and `--model tiny`.

Each model is built once with a fixed seed, saved with `save_pretrained` and loaded back through the
ordinary `from_pretrained` path, so code that works on a tiny model works on the real one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from tuner.atomic import write_folder_atomically
from tuner.errors import ModelError

TINY_MODELS: tuple[str, ...] = (
    "sdxl",
    "qwen2-vl",
    "qwen2.5-vl",
    "qwen3-vl",
    "qwen3-vl-thinking",
    "qwen3-vl-moe",
)
# Tiny helper models no training task uses: `build_tiny("clip")` is the CLIP that scores SDXL evals in tests.
TINY_HELPERS: tuple[str, ...] = ("clip",)

# The tiny family `tiny` means for each task.
_DEFAULT_FOR_TASK = {"sdxl-lora": "sdxl", "qwenvl-lora": "qwen2.5-vl"}


def default_root() -> Path:
    """Where tiny models are cached: $TUNER_TINY_DIR, else ~/.cache/tuner/tiny."""
    configured = os.environ.get("TUNER_TINY_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "tuner" / "tiny"


def resolve_tiny_alias(name_or_path: str, task: str) -> str | None:
    """The tiny model name that `name_or_path` asks for (`tiny`, `tiny-<name>`), or None for anything else."""
    if name_or_path == "tiny":
        return _DEFAULT_FOR_TASK.get(task)
    prefix = "tiny-"
    if name_or_path.startswith(prefix) and name_or_path[len(prefix) :] in TINY_MODELS:
        return name_or_path[len(prefix) :]
    return None


def build_tiny(name: str, root: Path | None = None) -> Path:
    """Build (once) and return the folder of the saved tiny model `name`.

    The folder name carries the builder version, so a changed builder builds a new folder. The model is
    written to a temporary folder beside it and moved into place in one step, under a file lock, so
    concurrent processes never see a half-written model.
    """
    builder, version = _builder(name)
    root = Path(root) if root is not None else default_root()
    folder = root / f"{name}-v{version}"
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{folder.name}.lock"):
        if folder.is_dir():
            return folder
        try:
            write_folder_atomically(folder, builder)
        except OSError:
            # Without a file lock another process may have moved its build into place first.
            if not folder.is_dir():
                raise
    return folder


def _builder(name: str) -> tuple[Callable[[Path], None], int]:
    if name == "sdxl":
        from tuner.tiny import sdxl

        return sdxl.build, sdxl.BUILDER_VERSION
    if name == "clip":
        from tuner.tiny import clip

        return clip.build, clip.BUILDER_VERSION
    if name in TINY_MODELS:
        from tuner.tiny import qwenvl

        return (lambda folder: qwenvl.build(name, folder)), qwenvl.BUILDER_VERSION
    raise ModelError(
        f"unknown tiny model {name!r}",
        hint=f"use one of: {', '.join(TINY_MODELS + TINY_HELPERS)}",
    )


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        from filelock import FileLock
    except ImportError:  # filelock comes with huggingface_hub; without it, os.replace stays atomic
        yield
        return
    with FileLock(str(path)):
        yield


def resolve_model_path(
    name_or_path: str,
    task: str,
    source: str = "huggingface",
    offline: bool = False,
    revision: str | None = None,
) -> str:
    """Where to load a model from: the built tiny model for `tiny`/`tiny-<name>`, else a folder or hub ID."""
    tiny = resolve_tiny_alias(name_or_path, task)
    if tiny is not None:
        return str(build_tiny(tiny))
    from tuner.runtime.hub import resolve_model_source

    return resolve_model_source(name_or_path, source, offline, revision)
