"""`tuner train sdxl-lora` and `tuner train qwenvl-lora`: flags -> config -> recipe."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tuner.cli import options
from tuner.config.schema import RunConfig

train_app = typer.Typer(help="Train a LoRA adapter.", no_args_is_help=True)

Resolution = Annotated[
    int | None, typer.Option("--resolution", help="Training side length in px (sets buckets).")
]
Vae = Annotated[str | None, typer.Option("--vae", help="A separate VAE, e.g. an fp16-safe one.")]
InitAdapter = Annotated[
    str | None,
    typer.Option(
        "--init-adapter",
        help="Start from this LoRA file (tuner, diffusers, PEFT or kohya); its rank and targets are used.",
    ),
]
SampleEvery = Annotated[
    int | None, typer.Option("--sample-every", help="Sample grid every N steps (0: at the end).")
]
SamplePrompt = Annotated[
    list[str] | None, typer.Option("--sample-prompt", help="Prompt for samples (repeatable).")
]
ImageColumn = Annotated[
    str | None, typer.Option("--image-column", help="Image column of a HF/metadata dataset.")
]
CaptionColumn = Annotated[
    str | None, typer.Option("--caption-column", help="Caption column of a HF/metadata dataset.")
]
CaptionPrefix = Annotated[
    str | None, typer.Option("--caption-prefix", help="Trigger word(s) put before every caption.")
]
CacheDir = Annotated[str | None, typer.Option("--cache-dir", help="Where latents/embeddings are cached.")]
ImageRoot = Annotated[str | None, typer.Option("--image-root", help="Folder image paths are relative to.")]
MaxPixels = Annotated[int | None, typer.Option("--max-pixels", help="Upper bound of pixels per image.")]
MinPixels = Annotated[int | None, typer.Option("--min-pixels", help="Lower bound of pixels per image.")]
MaxLength = Annotated[int | None, typer.Option("--max-length", help="Longest sample in tokens.")]
Attention = Annotated[
    str | None,
    typer.Option(
        "--attention", help="Attention kernel: sdpa, flash_attention_2 (flash-attn / torch_npu), eager."
    ),
]
Packing = Annotated[
    bool | None,
    typer.Option("--packing", help="Put a batch's samples end to end in one row (no padding)."),
]
Distributed = Annotated[
    str | None,
    typer.Option(
        "--distributed",
        help="How processes share the model: ddp (copies), zero2/zero3 (DeepSpeed), fsdp.",
    ),
]
NumProcesses = Annotated[
    int | None,
    typer.Option(
        "--num-processes",
        min=1,
        help="Processes per machine (one per device); above 1 the run restarts itself through "
        "`accelerate launch`.",
    ),
]
NumMachines = Annotated[int | None, typer.Option("--num-machines", min=1, help="Machines in the run.")]
MachineRank = Annotated[
    int | None, typer.Option("--machine-rank", min=0, help="This machine's index, 0 on the main one.")
]
MainProcessIp = Annotated[
    str | None, typer.Option("--main-process-ip", help="Address of machine 0 (multi-machine runs).")
]
MainProcessPort = Annotated[
    int | None, typer.Option("--main-process-port", help="Port on machine 0 (multi-machine runs).")
]
Targets = Annotated[
    str | None,
    typer.Option(
        "--targets",
        help="LoRA targets: llm, vision, merger; on Qwen3-VL-MoE also experts, router (comma-separated).",
    ),
]
SkipBad = Annotated[
    bool | None,
    typer.Option("--skip-bad", help="Train without bad samples (listed in OUTPUT/skipped.jsonl)."),
]
MaxBadFraction = Annotated[
    float | None,
    typer.Option("--max-bad-fraction", help="With --skip-bad, stop anyway above this share (default 0.05)."),
]
LogWith = Annotated[
    list[str] | None,
    typer.Option(
        "--log-with",
        help="Experiment tracker: tensorboard, wandb, swanlab or mlflow (repeatable; writes into --output).",
    ),
]
MaskedLoss = Annotated[
    bool | None,
    typer.Option(
        "--masked-loss",
        help="Weigh the loss by a mask per image: white trains, black is ignored (masks/ beside the "
        "images, --mask-dir, or the alpha channel).",
    ),
]
MaskDir = Annotated[
    str | None, typer.Option("--mask-dir", help="Folder of masks named like their images (--masked-loss).")
]
ImageData = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        help="Image folder or dataset; `tiny` for a generated one. Repeatable: the folders mix. PATH@N "
        "trains each image N times per epoch (style/@2; variety/@0.5: half of them each epoch).",
    ),
]
RegData = Annotated[
    list[str] | None,
    typer.Option(
        "--reg-data",
        help="Regularisation (class) images, trained with the prior loss; repeatable, PATH@N as --data "
        "(default: as many class samples per epoch as instance samples).",
    ),
]
ClassPrompt = Annotated[
    str | None,
    typer.Option("--class-prompt", help="Caption of a --reg-data image without a caption file."),
]
PriorLossWeight = Annotated[
    float | None,
    typer.Option("--prior-loss-weight", help="Weight of the class images' loss (default 1.0)."),
]
MaxNonfinite = Annotated[
    int | None,
    typer.Option("--max-nonfinite", help="Stop after this many NaN/inf steps in a row (default 5)."),
]


@train_app.command("sdxl-lora")
def sdxl_lora(
    model: options.Model = None,
    data: ImageData = None,
    reg_data: RegData = None,
    class_prompt: ClassPrompt = None,
    prior_loss_weight: PriorLossWeight = None,
    output: options.Output = None,
    preset: options.Preset = None,
    config: options.ConfigFile = None,
    set_: options.Set = None,
    resolution: Resolution = None,
    vae: Vae = None,
    init_adapter: InitAdapter = None,
    batch_size: options.BatchSize = None,
    grad_accum: options.GradAccum = None,
    max_steps: options.MaxSteps = None,
    epochs: options.Epochs = None,
    lr: options.Lr = None,
    rank: options.Rank = None,
    alpha: options.Alpha = None,
    seed: options.Seed = None,
    mixed_precision: options.MixedPrecision = None,
    device: options.Device = None,
    devices: options.Devices = None,
    checkpoint_every: options.CheckpointEvery = None,
    keep_checkpoints: options.KeepCheckpoints = None,
    resume: options.Resume = None,
    sample_every: SampleEvery = None,
    sample_prompt: SamplePrompt = None,
    image_column: ImageColumn = None,
    caption_column: CaptionColumn = None,
    caption_prefix: CaptionPrefix = None,
    cache_dir: CacheDir = None,
    masked_loss: MaskedLoss = None,
    mask_dir: MaskDir = None,
    overwrite: options.Overwrite = None,
    skip_bad: SkipBad = None,
    max_bad_fraction: MaxBadFraction = None,
    max_nonfinite: MaxNonfinite = None,
    log_with: LogWith = None,
    allow_pickle: options.AllowPickle = None,
    ca_bundle: options.CaBundle = None,
    hf_endpoint: options.HfEndpoint = None,
    offline: options.Offline = None,
    hub: options.Hub = None,
    insecure_skip_tls_verify: options.InsecureSkipTlsVerify = None,
    num_processes: NumProcesses = None,
    num_machines: NumMachines = None,
    machine_rank: MachineRank = None,
    main_process_ip: MainProcessIp = None,
    main_process_port: MainProcessPort = None,
) -> None:
    """Train an SDXL LoRA on image-caption pairs (kohya folders, metadata.jsonl/csv, HF datasets)."""
    flags = _common_flags(locals()) | {
        "data.resolution": resolution,
        "model.vae": vae,
        "lora.init_adapter": init_adapter,
        "output.sample_every": sample_every,
        "output.sample_prompts": sample_prompt or None,
        "data.image_column": image_column,
        "data.caption_column": caption_column,
        "data.caption_prefix": caption_prefix,
        "train.cache_dir": cache_dir,
        "data.masked_loss": masked_loss,
        "data.mask_dir": mask_dir,
        "data.class_prompt": class_prompt,
        "data.prior_loss_weight": prior_loss_weight,
        **_image_data_flags(data or [], reg_data or []),
    }
    config_obj = _build(task="sdxl-lora", preset=preset, config_file=config, flags=flags, overrides=set_)
    _relaunch_if_asked(config_obj, locals())

    from tuner.recipes.sdxl import train_sdxl_lora

    _report_done(train_sdxl_lora(config_obj, resume=resume))


@train_app.command("qwenvl-lora")
def qwenvl_lora(
    model: options.Model = None,
    data: options.Data = None,
    output: options.Output = None,
    preset: options.Preset = None,
    config: options.ConfigFile = None,
    set_: options.Set = None,
    image_root: ImageRoot = None,
    max_pixels: MaxPixels = None,
    min_pixels: MinPixels = None,
    max_length: MaxLength = None,
    packing: Packing = None,
    attention: Attention = None,
    targets: Targets = None,
    batch_size: options.BatchSize = None,
    grad_accum: options.GradAccum = None,
    max_steps: options.MaxSteps = None,
    epochs: options.Epochs = None,
    lr: options.Lr = None,
    rank: options.Rank = None,
    alpha: options.Alpha = None,
    seed: options.Seed = None,
    mixed_precision: options.MixedPrecision = None,
    device: options.Device = None,
    devices: options.Devices = None,
    checkpoint_every: options.CheckpointEvery = None,
    keep_checkpoints: options.KeepCheckpoints = None,
    resume: options.Resume = None,
    overwrite: options.Overwrite = None,
    skip_bad: SkipBad = None,
    max_bad_fraction: MaxBadFraction = None,
    max_nonfinite: MaxNonfinite = None,
    log_with: LogWith = None,
    allow_pickle: options.AllowPickle = None,
    trust_remote_code: options.TrustRemoteCode = None,
    distributed: Distributed = None,
    ca_bundle: options.CaBundle = None,
    hf_endpoint: options.HfEndpoint = None,
    offline: options.Offline = None,
    hub: options.Hub = None,
    insecure_skip_tls_verify: options.InsecureSkipTlsVerify = None,
    num_processes: NumProcesses = None,
    num_machines: NumMachines = None,
    machine_rank: MachineRank = None,
    main_process_ip: MainProcessIp = None,
    main_process_port: MainProcessPort = None,
) -> None:
    """Train a Qwen2-VL / Qwen2.5-VL / Qwen3-VL LoRA on image question-answer conversations."""
    flags = _common_flags(locals()) | {
        "data.image_root": image_root,
        "data.max_pixels": max_pixels,
        "data.min_pixels": min_pixels,
        "data.max_length": max_length,
        "data.packing": packing,
        "model.attention": attention,
        "model.trust_remote_code": trust_remote_code,
        "runtime.distributed": distributed,
        "lora.targets": [t.strip() for t in targets.split(",") if t.strip()] if targets else None,
    }
    config_obj = _build(task="qwenvl-lora", preset=preset, config_file=config, flags=flags, overrides=set_)
    _relaunch_if_asked(config_obj, locals())

    from tuner.recipes.qwenvl import train_qwenvl_lora

    _report_done(train_qwenvl_lora(config_obj, resume=resume))


# Flag name -> dotted config key, for the flags both training commands share.
_COMMON_FLAG_KEYS = {
    "model": "model.name_or_path",
    "data": "data.path",
    "output": "output.dir",
    "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "max_steps": "train.max_steps",
    "epochs": "train.epochs",
    "lr": "optim.lr",
    "rank": "lora.rank",
    "alpha": "lora.alpha",
    "seed": "train.seed",
    "mixed_precision": "runtime.mixed_precision",
    "device": "runtime.device",
    "devices": "runtime.devices",
    "checkpoint_every": "output.checkpoint_every",
    "keep_checkpoints": "output.keep_checkpoints",
    "overwrite": "output.overwrite",
    "skip_bad": "data.skip_bad",
    "max_bad_fraction": "data.max_bad_fraction",
    "max_nonfinite": "train.max_nonfinite",
    "log_with": "output.log_with",
    "allow_pickle": "model.allow_pickle",
    "ca_bundle": "hub.ca_bundle",
    "hf_endpoint": "hub.endpoint",
    "offline": "hub.offline",
    "hub": "hub.source",
    "insecure_skip_tls_verify": "hub.insecure_skip_tls_verify",
}


def _common_flags(arguments: dict[str, Any]) -> dict[str, Any]:
    return {key: arguments[name] for name, key in _COMMON_FLAG_KEYS.items()}


def _image_data_flags(data: list[str], reg_data: list[str]) -> dict[str, Any]:
    """SDXL's `--data PATH[@N]` (repeatable) and `--reg-data DIR[@N]`: the first --data is data.path
    (and data.repeats), every other one a data.sources entry. `--data` replaces the config's data.path,
    data.repeats and data.sources (the images are the ones the command names); `--reg-data` alone
    replaces data.sources."""
    from tuner.config.load import NULL
    from tuner.data.mixing import parse_data_flag

    sources = [parse_data_flag(value, "--data") for value in data]
    sources += [parse_data_flag(value, "--reg-data", reg=True) for value in reg_data]
    flags: dict[str, Any] = {"data.path": None}
    if data:
        first, *sources = sources
        flags |= {"data.path": first.path, "data.repeats": NULL if first.repeats is None else first.repeats}
    if data or reg_data:
        flags["data.sources"] = [source.model_dump() for source in sources]
    return flags


def _build(
    *, task: str, preset: str | None, config_file: Path | None, flags: dict, overrides: list[str] | None
) -> RunConfig:
    from tuner.config.load import build_config
    from tuner.errors import ConfigError
    from tuner.runtime import apply_hub_settings
    from tuner.runtime.stack import check_stack

    check_stack()
    config = build_config(
        preset=preset, config_file=config_file, flags=flags, overrides=overrides or (), task=task
    )
    if not config.output.dir:
        raise ConfigError(
            "no output folder given", hint="pass --output DIR (or set output.dir in the config)"
        )
    if not config.data.path and not config.data.sources:
        raise ConfigError("no dataset given", hint="pass --data PATH (or `--data tiny` for a generated one)")
    # Hub settings go into the environment before any recipe imports huggingface_hub.
    hub = config.hub
    for warning in apply_hub_settings(
        endpoint=hub.endpoint,
        ca_bundle=hub.ca_bundle,
        offline=hub.offline,
        insecure_skip_tls_verify=hub.insecure_skip_tls_verify,
        cache_dir=hub.cache_dir,
    ):
        print(f"warning: {warning}", file=sys.stderr)
    return config


def _relaunch_if_asked(config: RunConfig, arguments: dict[str, Any]) -> None:
    """With --num-processes/--num-machines above 1, replace this process by `accelerate launch` of the
    same command (without those flags); inside a launched process, do nothing."""
    import os

    from tuner.distributed import already_launched, relaunch_command, strip_launch_flags
    from tuner.launch import DEFAULT_PORT, format_command
    from tuner.runtime import resolve_runtime

    num_processes, num_machines = arguments["num_processes"] or 1, arguments["num_machines"] or 1
    if num_processes * num_machines == 1 or already_launched():
        return
    runtime = config.runtime
    resolved = resolve_runtime(runtime.device, runtime.mixed_precision, runtime.devices)
    command = relaunch_command(
        strip_launch_flags(sys.argv[1:]),
        num_processes=num_processes,
        device_type=resolved.device_type,
        mixed_precision=resolved.mixed_precision,
        num_machines=num_machines,
        machine_rank=arguments["machine_rank"] or 0,
        main_process_ip=arguments["main_process_ip"],
        main_process_port=arguments["main_process_port"] or DEFAULT_PORT,
    )
    print(f"launch: {format_command({}, command)}", flush=True)
    os.execv(command[0], command)


def _report_done(output_dir: Path) -> None:
    from tuner.distributed import launched_rank

    if launched_rank() == 0:  # once per run, not once per process
        from tuner.recipes.common import where_the_adapter_is

        print(f"\nDone. Everything is in {output_dir}/")
        where = where_the_adapter_is(output_dir)
        if where:
            print("The adapter, for each client:\n" + "\n".join(f"  {line}" for line in where))
