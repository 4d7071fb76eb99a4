"""Fuse an SDXL LoRA into its base model: a diffusers pipeline folder, or one original-layout checkpoint.

Everything that can be refused is checked before anything is written: each adapted module must exist in
the base with the shapes the LoRA matrices need. The LoRA is fused in fp32 (so rounding happens once,
at the final cast), then the model is cast to the requested dtype. The output is built in a hidden
folder beside `output` and moved into place with one `os.replace`, so an interrupted merge leaves no
output behind.

`--single-file` from a diffusers folder streams: every weight of the UNet, VAE and both text encoders
is read on its own with plain file reads (`tuner.formats.safetensors_stream.read_tensors`; a memory map
would keep every page read resident), gets its LoRA delta `scale * up @ down` in fp32, is cast, renamed
to the original layout and appended to the output file, then dropped. Only OpenCLIP's fused q/k/v
holds three weights at once. Peak memory is the adapter plus a few tensors (bigG's token embedding,
126 MB in fp16, is the largest) instead of the whole pipeline in fp32 (15.8 GB for SDXL); see
docs/benchmarks.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from tuner.atomic import give_default_modes, write_atomically, write_folder_atomically
from tuner.errors import ConfigError, ModelError
from tuner.formats.kohya import (
    COMPONENTS,
    BaseWeight,
    is_dora,
    is_kohya,
    kohya_to_diffusers,
    lora_deltas,
    read_safetensors,
    recorded_base,
    resolve_adapter_file,
)
from tuner.formats.safetensors_stream import SafetensorsStreamWriter, read_header, read_tensors
from tuner.formats.sdxl_folder import save_sdxl_folder
from tuner.formats.sdxl_single_file import (
    TEXT_ENCODER_2_PREFIX,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_tensors,
    open_clip_tensors,
    save_sdxl_single_file,
    vae_original_tensors,
)
from tuner.formats.sdxl_unet_layout import UNetLayout
from tuner.models.sdxl import SDXLComponents, load_sdxl
from tuner.models.sdxl_infer import build_pipeline, quiet_library_notes, resolve_sdxl_model
from tuner.models.sdxl_lora import is_lycoris, load_adapter_file
from tuner.tiny import resolve_tiny_alias

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
    return _base_warnings(metadata, base_name)


def _base_warnings(metadata: dict[str, str], base_name: str) -> list[str]:
    recorded = metadata.get("tuner.base_model")
    if recorded and _model_identity(recorded) != _model_identity(base_name):
        return [f"the adapter was trained on {recorded}, not {base_name}; the shapes fit, merging anyway"]
    return []


def _model_identity(name: str) -> str:
    """One name per model: `tiny` and `tiny-sdxl` are the same tiny model, and a local path is its
    absolute path (training records it so)."""
    tiny = resolve_tiny_alias(name, "sdxl-lora")
    if tiny is not None:
        return f"tiny-{tiny}"
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


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


def base_weights_of(components: SDXLComponents) -> BaseWeight:
    """(component, module) -> the module's frozen weight (under a PEFT layer, `.weight` is the base's)."""

    def base_weight(component: str, module: str) -> torch.Tensor:
        found = _find_module(getattr(components, component), module)
        if found is None or not hasattr(found, "weight"):
            raise ModelError(f"the base model has no layer {component}.{module}", hint=_WRONG_BASE_HINT)
        return found.weight.detach()

    return base_weight


def dora_base_weights(adapter: Path, base: str | None) -> BaseWeight | None:
    """The base weights a DoRA adapter's kohya export needs (`base`, else the base the adapter records);
    None for plain LoRA or when no base is known (the export then refuses and asks for --base)."""
    adapter_file = resolve_adapter_file(Path(adapter))
    if not is_dora(adapter_file):
        return None
    base = base or recorded_base(adapter_file, read_safetensors(adapter_file)[1])
    if base is None:
        return None
    return base_weights_of(load_sdxl(resolve_sdxl_model(base), weight_dtype=torch.float32))


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
    model_path = Path(resolve_sdxl_model(base))
    # LoKr/LoHa deltas are not low-rank products: those merge through PEFT in the pipeline.
    lycoris = is_lycoris(read_safetensors(adapter_file)[1])
    if single_file and model_path.is_dir() and not lycoris:
        return _merge_single_file_streaming(
            model_path, adapter_file, output, base, scale, DTYPES[dtype] if dtype else None, warn
        )
    components = load_sdxl(resolve_sdxl_model(base), weight_dtype=torch.float32)
    if lycoris:  # checked by PEFT as it loads (load_adapter_file), before anything is written
        warnings = _base_warnings(read_safetensors(adapter_file)[1], base)
    else:
        warnings = check_adapter_fits(components, adapter_file, base)
    for warning in warnings:
        warn(f"warning: {warning}")
    target_dtype = DTYPES[dtype] if dtype else _stored_dtype(resolve_sdxl_model(base))

    quiet_library_notes()
    pipeline = build_pipeline(components)
    load_adapter_file(pipeline, adapter_file, "merged")
    adapted = [
        name
        for name in COMPONENTS
        if getattr(pipeline, name, None) is not None and _has_lora(getattr(pipeline, name))
    ]
    pipeline.fuse_lora(components=adapted, lora_scale=scale, adapter_names=["merged"])
    pipeline.unload_lora_weights()
    pipeline.to(dtype=target_dtype)

    if not single_file:
        # The published folder layout (CLIP-L under `text_model.`), which ComfyUI reads text encoders by.
        return write_folder_atomically(output, lambda staging: save_sdxl_folder(pipeline, staging))

    def write_single_file(path: Path) -> None:
        save_sdxl_single_file(
            path,
            pipeline.unet,
            pipeline.vae,
            pipeline.text_encoder,
            pipeline.text_encoder_2,
            metadata=SINGLE_FILE_METADATA,
        )

    if output.suffix == ".safetensors":
        output.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(output, write_single_file)
    return write_folder_atomically(output, lambda staging: write_single_file(staging / SINGLE_FILE_NAME))


SINGLE_FILE_METADATA = {"modelspec.architecture": "stable-diffusion-xl-v1-base"}


def _merge_single_file_streaming(
    folder: Path,
    adapter_file: Path,
    output: Path,
    base_name: str,
    scale: float,
    dtype: torch.dtype | None,
    warn,
) -> Path:
    """`--single-file` from a diffusers folder, tensor by tensor (see the module docstring)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    state_dict, metadata = read_safetensors(adapter_file)
    unet_config = dict(UNet2DConditionModel.load_config(str(folder), subfolder="unet"))
    deltas = lora_deltas(state_dict, metadata, unet_config, source=str(adapter_file))
    if not deltas:
        raise ModelError(f"{adapter_file} holds no LoRA weights", hint="pass an SDXL LoRA file or folder")
    del state_dict  # the deltas hold what the merge needs of it
    files = {component: _weight_files(folder / component) for component in _STREAMED}
    # Refuse before writing: every adapted module exists with the shapes its LoRA needs.
    shapes = {
        (component, _module_name(key)): tuple(entry["shape"])
        for component, component_files in files.items()
        for file in component_files
        for key, entry in read_header(file).items()
    }
    deltas = {
        (component, _module_name(f"{module}.weight")): delta for (component, module), delta in deltas.items()
    }
    for (component, module), (down, up, _, _) in deltas.items():
        shape = shapes.get((component, module))
        if shape is None or down.shape[1] != shape[1] or up.shape[0] != shape[0]:
            raise ModelError(
                f"the adapter {adapter_file} does not fit the base model at {component}.{module}: LoRA "
                f"{tuple(down.shape)} x {tuple(up.shape)} vs base weight {shape}",
                hint=_WRONG_BASE_HINT,
            )
    for warning in _base_warnings(metadata, base_name):
        warn(f"warning: {warning}")
    target_dtype = dtype or _stored_dtype(str(folder))

    def merged(component: str) -> Iterator[tuple[str, torch.Tensor]]:
        """The component's weights from its files, one at a time, each with its LoRA delta fused in."""
        for file in files[component]:
            for key, tensor in read_tensors(file):
                delta = deltas.get((component, _module_name(key)))
                yield key, _fused(tensor, delta, scale, target_dtype) if delta is not None else tensor

    up_levels = len(AutoencoderKL.load_config(str(folder), subfolder="vae")["up_block_types"])
    layout = UNetLayout(unet_config)
    checkpoint = [
        (UNET_PREFIX, ((layout.to_original(key), value) for key, value in merged("unet"))),
        (VAE_PREFIX, vae_original_tensors(merged("vae"), up_levels)),
        (
            TEXT_ENCODER_PREFIX,
            ((k, v) for k, v in clip_tensors(merged("text_encoder")) if not k.endswith("position_ids")),
        ),
        (TEXT_ENCODER_2_PREFIX, open_clip_tensors(clip_tensors(merged("text_encoder_2")))),
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    target = output if output.suffix == ".safetensors" else output / SINGLE_FILE_NAME
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        with torch.no_grad(), SafetensorsStreamWriter(staging / target.name, SINGLE_FILE_METADATA) as writer:
            for prefix, tensors in checkpoint:
                for key, value in tensors:
                    writer.add(prefix + key, value.to(target_dtype))
        give_default_modes(staging)  # mkdtemp's folder is private (0700)
        if output.suffix == ".safetensors":
            os.replace(staging / target.name, output)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


# The parts `--single-file` streams from a diffusers folder, in the order the checkpoint holds them.
_STREAMED = ("unet", "vae", "text_encoder", "text_encoder_2")


def _module_name(weight_key: str) -> str:
    """The module a weight belongs to, in one naming for files and adapters: transformers 5 saves
    CLIPTextModel without the `text_model.` level its adapters may name (CLIPTextModelWithProjection
    keeps it)."""
    return weight_key.removesuffix(".weight").removeprefix("text_model.")


def _fused(
    weight: torch.Tensor,
    delta: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None],
    scale: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`weight + scale * alpha/r * up @ down` in fp32, then cast: PEFT's merge for Linear and Conv2d
    (whose `up` is 1x1, so the product of the flattened matrices is the convolution's delta). With a
    DoRA magnitude each output channel is then rescaled to it, as peft 0.21's DoRA merge does."""
    down, up, lora_scale, magnitude = delta
    product = up.flatten(1).float() @ down.flatten(1).float()
    merged = weight.float() + scale * lora_scale * product.reshape(weight.shape)
    if magnitude is not None:
        rows = merged.shape[0]
        norm = merged.reshape(rows, -1).norm(dim=1)
        merged = merged * (magnitude.float().flatten() / norm).reshape(rows, *[1] * (merged.dim() - 1))
    return merged.to(dtype)


def _weight_files(component_dir: Path) -> list[Path]:
    """A component's safetensors files, without variants (`*.fp16.safetensors`) beside the full ones."""
    files = sorted(component_dir.glob("*.safetensors"))
    plain = [file for file in files if "." not in file.name.removesuffix(".safetensors")]
    if not plain:
        raise ModelError(
            f"no safetensors weights in {component_dir}",
            hint="pass a diffusers SDXL folder with .safetensors weights (or merge without --single-file)",
        )
    return plain


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
