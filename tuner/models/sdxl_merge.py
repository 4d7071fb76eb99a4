"""Fuse an SDXL LoRA into its base model: a diffusers pipeline folder, or one original-layout checkpoint.

Everything that can be refused is checked before anything is written: each adapted module must exist in
the base with the shapes the LoRA matrices need. The LoRA is fused in fp32 (so rounding happens once,
at the final cast), then the model is cast to the requested dtype. The output is built in a hidden
folder beside `output` and moved into place with one `os.replace`, so an interrupted merge leaves no
output behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from tuner.errors import ConfigError, ModelError
from tuner.formats.kohya import (
    COMPONENTS,
    is_kohya,
    kohya_to_diffusers,
    read_safetensors,
    resolve_adapter_file,
)
from tuner.formats.sdxl_single_file import save_sdxl_single_file
from tuner.models.sdxl import SDXLComponents, load_sdxl
from tuner.models.sdxl_infer import build_pipeline, resolve_sdxl_model

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SINGLE_FILE_NAME = "model.safetensors"
_MATRIX_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")
_UP_SUFFIXES = (".lora_B.weight", ".lora.up.weight", ".lora_linear_layer.up.weight")


def adapter_modules(state_dict: dict[str, torch.Tensor], unet_config) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet.<module>": {"down": ..., "up": ...}} for a diffusers or kohya SDXL LoRA."""
    if is_kohya(state_dict):
        layers, _ = kohya_to_diffusers(state_dict, unet_config)
        state_dict = {
            f"{component}.{key}": value for component, part in layers.items() for key, value in part.items()
        }
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        for suffixes, matrix in ((_MATRIX_SUFFIXES, "down"), (_UP_SUFFIXES, "up")):
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix is not None:
                modules.setdefault(key[: -len(suffix)], {})[matrix] = tensor
    return modules


def check_adapter_fits(components: SDXLComponents, adapter_file: Path, base_name: str) -> list[str]:
    """Raise ModelError when the adapter's shapes do not fit the base; return warnings (a different base)."""
    state_dict, metadata = read_safetensors(adapter_file)
    models = {
        "unet": components.unet,
        "text_encoder": components.text_encoder,
        "text_encoder_2": components.text_encoder_2,
    }
    modules = adapter_modules(state_dict, components.unet.config)
    if not modules:
        raise ModelError(f"{adapter_file} holds no LoRA weights", hint="pass an SDXL LoRA file or folder")
    for name, matrices in modules.items():
        component, _, module_path = name.partition(".")
        if component not in COMPONENTS:
            raise ModelError(
                f"LoRA module {name} in {adapter_file} is for no SDXL part", hint=_WRONG_BASE_HINT
            )
        module = _find_module(models[component], module_path)
        if module is None or not hasattr(module, "weight"):
            raise ModelError(
                f"the adapter {adapter_file} adapts {name}, which the base model has no layer for",
                hint=_WRONG_BASE_HINT,
            )
        weight = module.weight
        down, up = matrices.get("down"), matrices.get("up")
        if down is None or up is None or down.shape[1] != weight.shape[1] or up.shape[0] != weight.shape[0]:
            raise ModelError(
                f"the adapter {adapter_file} does not fit the base model at {name}: LoRA "
                f"{tuple(down.shape) if down is not None else None} x "
                f"{tuple(up.shape) if up is not None else None} vs base weight {tuple(weight.shape)}",
                hint=_WRONG_BASE_HINT,
            )
    recorded = metadata.get("tuner.base_model")
    if recorded and recorded not in (base_name, f"tiny-{base_name}" if base_name == "tiny" else base_name):
        return [f"the adapter was trained on {recorded}, not {base_name}; the shapes fit, merging anyway"]
    return []


_WRONG_BASE_HINT = (
    "the adapter was made for another model architecture: merge it into the base it was trained on"
)


def _find_module(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    # transformers 5 dropped CLIPTextModel's `text_model` wrapper; adapters name either layout.
    for candidate in (path, path.removeprefix("text_model.")):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def merge_sdxl_adapter(
    base: str,
    adapter: Path,
    output: Path,
    *,
    scale: float = 1.0,
    dtype: str | None = None,
    single_file: bool = False,
    warn=print,
) -> Path:
    """Fuse `adapter` into `base` at `scale`; write a diffusers folder (or one checkpoint) at `output`."""
    output = Path(output)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", hint="choose fp16, bf16 or fp32")
    if output.exists():
        raise ConfigError(f"{output} already exists", hint="choose a new --output or remove the old one")
    adapter_file = resolve_adapter_file(Path(adapter))
    components = load_sdxl(resolve_sdxl_model(base), weight_dtype=torch.float32)
    for warning in check_adapter_fits(components, adapter_file, base):
        warn(f"warning: {warning}")
    target_dtype = DTYPES[dtype] if dtype else _stored_dtype(resolve_sdxl_model(base))

    pipeline = build_pipeline(components)
    pipeline.load_lora_weights(str(adapter_file.parent), weight_name=adapter_file.name, adapter_name="merged")
    adapted = [
        name
        for name in COMPONENTS
        if getattr(pipeline, name, None) is not None and _has_lora(getattr(pipeline, name))
    ]
    pipeline.fuse_lora(components=adapted, lora_scale=scale, adapter_names=["merged"])
    pipeline.unload_lora_weights()
    pipeline.to(dtype=target_dtype)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        if single_file:
            target = staging / (output.name if output.suffix == ".safetensors" else SINGLE_FILE_NAME)
            save_sdxl_single_file(
                target,
                pipeline.unet,
                pipeline.vae,
                pipeline.text_encoder,
                pipeline.text_encoder_2,
                metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"},
            )
            os.replace(target if output.suffix == ".safetensors" else staging, output)
        else:
            pipeline.save_pretrained(staging, safe_serialization=True)
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _has_lora(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def _stored_dtype(model_path: str) -> torch.dtype:
    """The dtype the base's UNet weights are stored in (fp32 when it cannot tell)."""
    from safetensors import safe_open

    path = Path(model_path)
    files = [path] if path.is_file() else sorted((path / "unet").glob("*.safetensors"))
    if not files:
        return torch.float32
    with safe_open(str(files[0]), framework="pt") as handle:
        first = next(iter(handle.keys()), None)
        return (
            handle.get_slice(first).get_dtype() and handle.get_tensor(first).dtype if first else torch.float32
        )
