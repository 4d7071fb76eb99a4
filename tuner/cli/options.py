"""Typed CLI options shared by several commands. Each maps to one dotted config key (see train.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

# Every option defaults to None, meaning "not given": only given flags override the config layers.
Device = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or npu.")]
Devices = Annotated[str | None, typer.Option("--devices", help="Device indices to use, e.g. 0,1.")]
MixedPrecision = Annotated[str | None, typer.Option("--mixed-precision", help="auto, no, fp16 or bf16.")]
CaBundle = Annotated[
    str | None,
    typer.Option("--ca-bundle", help="PEM file of CA certificates for hub downloads (also TUNER_CA_BUNDLE)."),
]
HfEndpoint = Annotated[
    str | None, typer.Option("--hf-endpoint", help="Hub mirror URL, e.g. a company mirror.")
]
Offline = Annotated[bool | None, typer.Option("--offline", help="Use local files and the hub cache only.")]
Hub = Annotated[str | None, typer.Option("--hub", help="Model source: huggingface or modelscope.")]
InsecureSkipTlsVerify = Annotated[
    bool | None,
    typer.Option(
        "--insecure-skip-tls-verify",
        help="DANGEROUS: turn TLS verification off for hub downloads only. Prefer --ca-bundle.",
    ),
]


def apply_hub_flags(
    ca_bundle: str | None,
    hf_endpoint: str | None,
    offline: bool | None,
    insecure_skip_tls_verify: bool | None,
) -> None:
    """The hub options of a command without a run config (env, infer, merge, convert, eval), applied before
    anything imports huggingface_hub; TUNER_CA_BUNDLE stands in for a missing --ca-bundle."""
    from tuner.runtime import apply_hub_settings

    for warning in apply_hub_settings(
        endpoint=hf_endpoint,
        ca_bundle=ca_bundle,
        offline=bool(offline),
        insecure_skip_tls_verify=bool(insecure_skip_tls_verify),
    ):
        print(f"warning: {warning}", file=sys.stderr)


Model = Annotated[
    str | None, typer.Option("--model", help="Hub ID, local folder or checkpoint; `tiny` for the built-in.")
]
Data = Annotated[
    str | None, typer.Option("--data", help="Dataset file or folder; `tiny` for a generated one.")
]
Output = Annotated[
    str | None, typer.Option("--output", "-o", help="Folder for the adapter, config, metrics, samples.")
]
Preset = Annotated[str | None, typer.Option("--preset", help="A preset name, see `tuner presets list`.")]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="A YAML config (e.g. a previous tuner_config.yaml).")
]
Set = Annotated[
    list[str] | None, typer.Option("--set", help="Override any config key: --set optim.lr=5e-5 (repeatable).")
]
BatchSize = Annotated[int | None, typer.Option("--batch-size", help="Samples per device per micro-step.")]
GradAccum = Annotated[int | None, typer.Option("--grad-accum", help="Micro-steps per optimizer step.")]
MaxSteps = Annotated[
    int | None, typer.Option("--max-steps", help="Optimizer steps to train (wins over --epochs).")
]
Epochs = Annotated[int | None, typer.Option("--epochs", help="Passes over the dataset.")]
Lr = Annotated[float | None, typer.Option("--lr", help="Learning rate.")]
Rank = Annotated[int | None, typer.Option("--rank", help="LoRA rank.")]
Alpha = Annotated[float | None, typer.Option("--alpha", help="LoRA alpha (scale = alpha / rank).")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
CheckpointEvery = Annotated[
    int | None, typer.Option("--checkpoint-every", help="Checkpoint every N steps (0: off).")
]
KeepCheckpoints = Annotated[int | None, typer.Option("--keep-checkpoints", help="Checkpoints to keep.")]
Resume = Annotated[
    str | None, typer.Option("--resume", help="`latest` or a checkpoint folder to continue from.")
]
Overwrite = Annotated[bool | None, typer.Option("--overwrite", help="Replace a finished run in --output.")]
AllowPickle = Annotated[
    bool | None,
    typer.Option("--allow-pickle", help="Allow loading pickle weights (.bin/.ckpt): runs code in them."),
]
TrustRemoteCode = Annotated[
    bool | None,
    typer.Option("--trust-remote-code", help="Run model code from the hub repository (off by default)."),
]
