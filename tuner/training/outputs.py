"""The output folder before a run starts: never train over a finished run by accident, and never resume
with settings that would make the rest of the run a different run.

Called by every recipe before any model is loaded, so a refusal costs nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tuner.config.load import RESOLVED_CONFIG_NAME
from tuner.errors import CheckpointError, ConfigError
from tuner.training.checkpoints import checkpoints_root, complete_checkpoints

# What a finished run leaves behind: the SDXL (diffusers/kohya) and the PEFT adapter files.
ADAPTER_FILES = (
    "pytorch_lora_weights.safetensors",
    "pytorch_lora_weights_kohya.safetensors",
    "adapter_model.safetensors",
)
# Logs that a new run appends to: stale lines from the replaced run would mix into them.
APPENDED_LOGS = ("metrics.jsonl", "skipped.jsonl")
# Keys a resumed run may change: how long it runs, what it logs and writes, and where it downloads from.
# Everything else changes what the remaining steps compute, so the result would match no single run.
SAFE_TO_CHANGE_ON_RESUME = (
    "train.max_steps",
    "train.epochs",
    "output.dir",
    "output.log_every",
    "output.checkpoint_every",
    "output.keep_checkpoints",
    "output.sample_every",
    "output.sample_prompts",
    "output.overwrite",
    "data.num_workers",
    "hub.",
)


def prepare_output_folder(
    output_dir: Path, config: Mapping[str, Any], resume: str | None, overwrite: bool
) -> list[str]:
    """Check (and with `overwrite`, clear) `output_dir` for a new or resumed run.

    `config` is the new run's resolved config as a plain dict (`RunConfig.model_dump(mode="json")`).
    Returns notes to print (the safe keys a resume changes). Raises when the folder holds a finished
    or unfinished run and neither `resume` nor `overwrite` says what to do with it, or when a resume
    changes a key outside SAFE_TO_CHANGE_ON_RESUME.
    """
    output_dir = Path(output_dir)
    if resume is not None and overwrite:
        raise ConfigError(
            "--resume and --overwrite contradict each other",
            hint="--resume continues the run in the output folder; --overwrite replaces it",
        )
    if resume is not None:
        return check_resume_config(output_dir, config)
    finished = [name for name in ADAPTER_FILES if (output_dir / name).is_file()]
    checkpoints = complete_checkpoints(output_dir)
    if overwrite:
        clear_previous_run(output_dir)
        return []
    if finished:
        raise ConfigError(
            f"{output_dir} already holds a finished run ({finished[0]})",
            hint="choose another --output, pass --overwrite to replace it, "
            "or --resume latest (with a higher --max-steps) to train it further",
        )
    if checkpoints:
        raise CheckpointError(
            f"{output_dir} holds checkpoints of an unfinished run (newest: {checkpoints[-1].name})",
            hint="pass --resume latest to continue it, --overwrite to start again, "
            "or choose another --output",
        )
    return []


def clear_previous_run(output_dir: Path) -> None:
    """Delete what `--overwrite` replaces: the checkpoints (a later `--resume latest` must not pick up
    the old run's), the finished adapters and the appended logs. The SDXL cache stays: it is keyed by
    content, so it is still right and saves re-encoding every image."""
    shutil.rmtree(checkpoints_root(output_dir), ignore_errors=True)
    for name in (*ADAPTER_FILES, *APPENDED_LOGS):
        (output_dir / name).unlink(missing_ok=True)


def check_resume_config(output_dir: Path, config: Mapping[str, Any]) -> list[str]:
    """Compare the config saved with the run to the resumed one; refuse unsafe changes, report safe ones."""
    saved_path = Path(output_dir) / RESOLVED_CONFIG_NAME
    if not saved_path.is_file():
        raise CheckpointError(
            f"cannot resume: {saved_path} is missing, so the run's settings are unknown",
            hint="point --output at the folder of the run to continue",
        )
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    differences = changed_keys(saved, config)
    unsafe = [key for key in differences if not _safe_to_change(key)]
    if unsafe:
        listed = "\n".join(f"  {key}: {differences[key][0]!r} -> {differences[key][1]!r}" for key in unsafe)
        raise ConfigError(
            f"cannot resume the run in {output_dir} with a changed config:\n{listed}",
            hint=f"resume with the settings in {saved_path} (pass --config {saved_path}), "
            "or start a new run in another --output",
        )
    return [
        f"resuming with {key} changed: {differences[key][0]!r} -> {differences[key][1]!r}"
        for key in differences
        if key != "output.dir"
    ]


def changed_keys(saved: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved value, new value) for every key whose value differs."""
    flat_saved, flat_new = _flatten(saved), _flatten(new)
    return {
        key: (flat_saved.get(key), flat_new.get(key))
        for key in sorted(flat_saved.keys() | flat_new.keys())
        if flat_saved.get(key) != flat_new.get(key)
    }


def _safe_to_change(key: str) -> bool:
    return any(
        key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in SAFE_TO_CHANGE_ON_RESUME
    )


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            # YAML gives lists where the dumped config had tuples (betas, background).
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat
