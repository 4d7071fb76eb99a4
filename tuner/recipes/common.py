"""The steps every recipe takes the same way before its model-specific part: the output folder, the
base model's location, and the record of the run (resolved config, trackers)."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from tuner.config.load import write_resolved_config
from tuner.config.schema import RunConfig
from tuner.errors import ConfigError
from tuner.tiny import resolve_model_path, resolve_tiny_alias
from tuner.training.outputs import prepare_output_folder
from tuner.training.trackers import start_trackers


def open_output_folder(config: RunConfig, task: str, resume: str | None) -> Path:
    """The run's output folder, ready for a new run, an overwrite or a resume (see prepare_output_folder)."""
    if not config.output.dir or not (config.data.path or config.data.sources):
        raise ConfigError(f"{task} needs output.dir and data.path", hint="pass --output DIR and --data PATH")
    output_dir = Path(config.output.dir)
    for note in prepare_output_folder(
        output_dir, config.model_dump(mode="json"), resume, config.output.overwrite
    ):
        print(note)
    return output_dir


def resolve_base_model(config: RunConfig, task: str) -> tuple[str, str]:
    """(where to load the base model from, the name recorded with the adapter)."""
    requested = config.model.name_or_path
    tiny = resolve_tiny_alias(requested, task)
    if tiny is not None:
        return resolve_model_path(requested, task), f"tiny-{tiny}"
    hub = config.hub
    return resolve_model_path(requested, task, hub.source, hub.offline, config.model.revision), requested


def record_run(config: RunConfig, accelerator: Accelerator, output_dir: Path) -> None:
    """The resolved config next to the outputs, and the trackers `output.log_with` asks for."""
    if accelerator.is_main_process:
        write_resolved_config(config, output_dir)
    start_trackers(
        accelerator, config.output.log_with, output_dir, config.model_dump(mode="json"), config.hub.offline
    )
