"""The output folder before a run starts: never train over a finished run by accident, and never resume
with settings that would make the rest of the run a different run.

Called by every recipe before any model is loaded, so a refusal costs nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuner.config.load import RESOLVED_CONFIG_NAME
from tuner.errors import CheckpointError, ConfigError
from tuner.models.qwenvl import ADAPTER_METADATA_FILE, EMA_ADAPTER_DIR
from tuner.models.qwenvl_serve import SERVE_FILE
from tuner.models.sdxl_lora import ADAPTER_FILE, EMA_ADAPTER_FILE, KOHYA_ADAPTER_FILE
from tuner.report.html import ENVIRONMENT_FILE
from tuner.report.html import REPORT_FILE as HTML_REPORT_FILE
from tuner.training.bad_data import REPORT_FILE, SKIPPED_FILE
from tuner.training.checkpoints import checkpoints_root, complete_checkpoints
from tuner.training.metrics import LOSS_PLOT_FILE, METRICS_FILE, SAMPLES_DIR
from tuner.training.trackers import MLFLOW_DIR, SWANLAB_DIR, TENSORBOARD_DIR, WANDB_DIR


@dataclass(frozen=True)
class RunOutput:
    """A file or folder that a run writes into its output folder."""

    name: str  # relative to the output folder
    # Written only once training has finished: its presence means the folder holds a finished run.
    result: bool = False


# Everything a run writes into its output folder, both recipes: a new output goes here, or `--overwrite`
# leaves the old run's copy behind and a finished run may go unnoticed. Not listed, on purpose: the
# SDXL cache (`cache/`, keyed by content, so still right for the new run) and files the user put there.
RUN_OUTPUTS: tuple[RunOutput, ...] = (
    # SDXL: the diffusers adapter, its EMA twin, the kohya copy.
    RunOutput(ADAPTER_FILE, result=True),
    RunOutput(EMA_ADAPTER_FILE, result=True),
    RunOutput(KOHYA_ADAPTER_FILE, result=True),
    # Qwen-VL: the PEFT adapter, tuner's record of it, the EMA adapter folder, PEFT's model card and
    # the processor files saved beside the adapter (their set depends on the transformers version).
    RunOutput("adapter_model.safetensors", result=True),
    RunOutput("adapter_config.json", result=True),
    RunOutput(ADAPTER_METADATA_FILE, result=True),
    RunOutput(EMA_ADAPTER_DIR, result=True),
    RunOutput("README.md"),
    *(
        RunOutput(name)
        for name in (
            "processor_config.json",
            "preprocessor_config.json",
            "video_preprocessor_config.json",
            "chat_template.jinja",
            "chat_template.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "vocab.json",
            "merges.txt",
        )
    ),
    # Both: how to serve the adapter, sample grids (SDXL) or answers.jsonl (Qwen-VL), logs, the loss
    # plot, the data gate's report, checkpoints, the resolved config.
    RunOutput(SERVE_FILE, result=True),
    RunOutput(SAMPLES_DIR),
    RunOutput(METRICS_FILE),
    RunOutput(SKIPPED_FILE),
    RunOutput(LOSS_PLOT_FILE),
    RunOutput(REPORT_FILE),
    RunOutput(checkpoints_root(Path()).name),
    RunOutput(RESOLVED_CONFIG_NAME),
    # The run report and the environment it records; the offline trackers' folders. `eval/` is where
    # docs/report.md has `tuner eval` write a run's comparison, which the report shows: left behind, the
    # replaced run's scores would pass for the new run's.
    RunOutput(HTML_REPORT_FILE),
    RunOutput("eval"),
    RunOutput(ENVIRONMENT_FILE),
    RunOutput(TENSORBOARD_DIR),
    RunOutput(MLFLOW_DIR),
    RunOutput(SWANLAB_DIR),
    RunOutput(WANDB_DIR),
)
# Keys a resumed run may change: how long it runs, what it logs and writes, and where it downloads from.
# Everything else changes what the remaining steps compute, so the result would match no single run.
SAFE_TO_CHANGE_ON_RESUME = (
    "train.max_steps",
    "train.epochs",
    "train.extend_schedule",
    "output.dir",
    "output.log_every",
    "output.checkpoint_every",
    "output.keep_checkpoints",
    "output.sample_every",
    "output.sample_prompts",
    "output.validate_every",
    "output.eval_every",
    "output.save_format",
    "output.overwrite",
    "data.num_workers",
    "data.pin_memory",
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
    finished = [
        output.name for output in RUN_OUTPUTS if output.result and (output_dir / output.name).exists()
    ]
    checkpoints = complete_checkpoints(output_dir)
    if overwrite:
        clear_previous_run(output_dir)
        return []
    if finished:
        raise ConfigError(
            f"{output_dir} already holds a finished run ({finished[0]})",
            hint="choose another --output, pass --overwrite to replace it, "
            "or --resume latest with a higher --max-steps to train it further "
            "(every run ends with a checkpoint; --set train.extend_schedule=true stretches the lr schedule)",
        )
    if checkpoints:
        raise CheckpointError(
            f"{output_dir} holds checkpoints of an unfinished run (newest: {checkpoints[-1].name})",
            hint="pass --resume latest to continue it, --overwrite to start again, "
            "or choose another --output",
        )
    return []


def clear_previous_run(output_dir: Path) -> None:
    """Delete what `--overwrite` replaces: everything in RUN_OUTPUTS, so no file of the old run (a
    checkpoint `--resume latest` would pick up, an EMA adapter or sample grid the new run does not
    write, lines in a log the new run appends to) passes for the new run's. The SDXL cache stays."""
    for output in RUN_OUTPUTS:
        path = Path(output_dir) / output.name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
