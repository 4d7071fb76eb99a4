"""`tuner convert`: SDXL LoRA files between tuner's diffusers layout and kohya's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def convert_command(
    source: Annotated[Path, typer.Argument(help="The LoRA to convert (file or tuner output folder).")],
    target: Annotated[Path, typer.Argument(help="kohya: a .safetensors file; diffusers: a folder.")],
    to: Annotated[str, typer.Option("--to", help="kohya or diffusers.")],
    base: Annotated[
        str | None,
        typer.Option("--base", help="Base model whose UNet layout names the modules (default SDXL)."),
    ] = None,
) -> None:
    """Convert an SDXL LoRA to the kohya layout (ComfyUI, A1111/Forge, sd-scripts) or back to diffusers."""
    from tuner.errors import ConfigError
    from tuner.formats.kohya import export_kohya, import_kohya
    from tuner.runtime.stack import check_stack

    check_stack()

    unet_config = _unet_config(base) if base else None
    if to == "kohya":
        written = export_kohya(source, target, unet_config)
    elif to in ("diffusers", "peft"):
        written = import_kohya(source, target, unet_config)
    else:
        raise ConfigError(f"unknown --to {to!r}", hint="choose kohya or diffusers")
    print(f"wrote {written}")


def _unet_config(base: str) -> dict:
    from diffusers import UNet2DConditionModel

    from tuner.models.sdxl_infer import resolve_sdxl_model

    return dict(UNet2DConditionModel.load_config(resolve_sdxl_model(base), subfolder="unet"))
