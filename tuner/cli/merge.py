"""`tuner merge`: fuse an adapter into its base model. The model family is read from the adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuner.cli import options

PEFT_CONFIG_FILE = "adapter_config.json"


def merge_command(
    base: Annotated[str, typer.Option("--base", help="The base model: hub ID, folder or `tiny`.")],
    adapter: Annotated[Path, typer.Option("--adapter", help="The adapter folder (or SDXL LoRA file).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the merged model goes (new).")],
    scale: Annotated[float, typer.Option("--scale", help="LoRA strength to fuse at.")] = 1.0,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="fp16, bf16 or fp32 (default: the base's).")
    ] = None,
    single_file: Annotated[
        bool, typer.Option("--single-file", help="SDXL: one original-layout .safetensors checkpoint.")
    ] = False,
    offline: options.Offline = None,
    ca_bundle: options.CaBundle = None,
    hf_endpoint: options.HfEndpoint = None,
    insecure_skip_tls_verify: options.InsecureSkipTlsVerify = None,
) -> None:
    """Merge a LoRA into its base: SDXL (diffusers LoRA file) or Qwen-VL (PEFT folder)."""
    options.apply_hub_flags(ca_bundle, hf_endpoint, offline, insecure_skip_tls_verify)
    from tuner.runtime.stack import check_stack

    check_stack()
    if (adapter / PEFT_CONFIG_FILE).is_file():
        from tuner.errors import ConfigError
        from tuner.models.qwenvl_merge import merge_qwenvl_adapter

        if single_file:
            raise ConfigError(
                "--single-file is for SDXL only", hint="drop --single-file for a Qwen-VL adapter"
            )
        written = merge_qwenvl_adapter(base, adapter, output, scale, dtype, offline=bool(offline))
    else:
        from tuner.models.sdxl_merge import merge_sdxl_adapter

        written = merge_sdxl_adapter(base, adapter, output, scale=scale, dtype=dtype, single_file=single_file)
    print(f"merged model: {written}")
