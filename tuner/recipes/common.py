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
    """(where to load the base model from, the name recorded with the adapter: a hub ID as given, a local
    path made absolute, so the record still names the base when read from another folder)."""
    requested = config.model.name_or_path
    tiny = resolve_tiny_alias(requested, task)
    if tiny is not None:
        return resolve_model_path(requested, task), f"tiny-{tiny}"
    hub = config.hub
    local = Path(requested).expanduser()
    recorded = str(local.resolve()) if local.exists() else requested
    return resolve_model_path(requested, task, hub.source, hub.offline, config.model.revision), recorded


def record_run(config: RunConfig, accelerator: Accelerator, output_dir: Path) -> None:
    """The resolved config next to the outputs, and the trackers `output.log_with` asks for."""
    if accelerator.is_main_process:
        write_resolved_config(config, output_dir)
    start_trackers(
        accelerator, config.output.log_with, output_dir, config.model_dump(mode="json"), config.hub.offline
    )


def where_the_adapter_is(output_dir: Path) -> list[str]:
    """Which file of a finished run each client takes: printed at the end of a run, so a user does not
    have to know that ComfyUI wants the kohya file or that vLLM wants the lines of serve.md."""
    from safetensors import safe_open

    from tuner.models.qwenvl_serve import SERVE_FILE
    from tuner.models.sdxl_lora import ADAPTER_FILE, KOHYA_ADAPTER_FILE, is_lycoris

    lines = []
    diffusers_file = output_dir / ADAPTER_FILE
    if diffusers_file.is_file():
        with safe_open(str(diffusers_file), framework="pt") as handle:
            header = handle.metadata() or {}
        # LoKr/LoHa files hold PEFT's names, which diffusers' load_lora_weights does not read.
        readers = (
            "tuner infer/merge" if is_lycoris(header) else "diffusers (load_lora_weights), tuner infer/merge"
        )
        lines.append(f"{readers}: {diffusers_file}")
    if (output_dir / KOHYA_ADAPTER_FILE).is_file():
        lines.append(f"ComfyUI, A1111, Forge (their LoRA folder): {output_dir / KOHYA_ADAPTER_FILE}")
    if (output_dir / "adapter_config.json").is_file():
        lines.append(f"transformers + PEFT (PeftModel.from_pretrained), tuner infer/merge: {output_dir}/")
    if (output_dir / SERVE_FILE).is_file():
        lines.append(
            f"vLLM: the command lines in {output_dir / SERVE_FILE} (also: tuner serve-command {output_dir})"
        )
    return lines
