"""`tuner convert`: SDXL LoRA files between tuner's diffusers layout and kohya's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuner.cli import options


def convert_command(
    source: Annotated[Path, typer.Argument(help="The LoRA to convert (file or tuner output folder).")],
    target: Annotated[Path, typer.Argument(help="kohya: a .safetensors file; diffusers: a folder.")],
    to: Annotated[str, typer.Option("--to", help="kohya or diffusers.")],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base model whose UNet layout names the modules (default: the base the adapter records; "
            "SDXL base's when the LoRA shapes fit it).",
        ),
    ] = None,
    offline: options.Offline = None,
    ca_bundle: options.CaBundle = None,
    hf_endpoint: options.HfEndpoint = None,
    insecure_skip_tls_verify: options.InsecureSkipTlsVerify = None,
) -> None:
    """Convert an SDXL LoRA to the kohya layout (ComfyUI, A1111/Forge, sd-scripts) or back to diffusers."""
    # The base's UNet config (--base, or the base the adapter records) may come from the hub.
    options.apply_hub_flags(ca_bundle, hf_endpoint, offline, insecure_skip_tls_verify)
    from tuner.errors import ConfigError
    from tuner.formats.kohya import base_unet_config, export_kohya, import_kohya
    from tuner.runtime.stack import check_stack

    check_stack()

    unet_config = base_unet_config(base) if base else None
    if to == "kohya":
        from tuner.models.sdxl_merge import dora_base_weights

        written = export_kohya(source, target, unet_config, base_weight=dora_base_weights(source, base))
    elif to in ("diffusers", "peft"):
        written = import_kohya(source, target, unet_config)
    else:
        raise ConfigError(f"unknown --to {to!r}", hint="choose kohya or diffusers")
    print(f"wrote {written}")
