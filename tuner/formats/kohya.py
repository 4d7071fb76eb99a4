"""SDXL LoRA files: tuner's diffusers/PEFT layout <-> the kohya layout (sd-scripts, ComfyUI, A1111/Forge).

kohya names a module by its path in the *original* SDXL UNet with `_` for `.`
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), `lora_te1_` / `lora_te2_` for the
CLIP-L and bigG text encoders, and stores `.lora_down.weight`, `.lora_up.weight` and `.alpha` per
module; the applied scale is `alpha / rank`. diffusers stores PEFT's `lora_A`/`lora_B` (or its older
`lora.down`/`lora.up`) and keeps rank and alpha in the `lora_adapter_metadata` header, where PEFT's
scale is `lora_alpha / r` (`/ sqrt(r)` with rsLoRA). Conversion keeps each module's effective scale.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tuner.errors import ModelError
from tuner.formats.sdxl_unet_layout import UNetLayout

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
COMPONENTS = tuple(KOHYA_PREFIXES)
DIFFUSERS_ADAPTER_FILE = "pytorch_lora_weights.safetensors"

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: the layout kohya files are named after.
SDXL_BASE_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
KOHYA_METADATA = {
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_network_module": "networks.lora",
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
}
# (suffix of a diffusers/PEFT key, which LoRA matrix it is)
_DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
)
_TEXT_ENCODER_MODULE = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)$")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot read the LoRA file {path}: {error}", hint="pass a .safetensors LoRA file"
        ) from error


def is_kohya(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith(tuple(KOHYA_PREFIXES.values())) for key in state_dict)


@functools.cache
def _unet_modules(config_json: str) -> dict[str, str]:
    """kohya module name -> diffusers module name, for every Linear/Conv2d a LoRA can adapt."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(config_json))
    layout = UNetLayout(unet.config)
    return {
        KOHYA_PREFIXES["unet"] + layout.to_original(name).replace(".", "_"): name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }


def unet_kohya_names(unet_config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """kohya name -> diffusers module name for a UNet config (SDXL base's by default)."""
    config = dict(unet_config if unet_config is not None else SDXL_BASE_UNET_CONFIG)
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    return _unet_modules(json.dumps(config, sort_keys=True))


def _kohya_text_encoder_module(name: str) -> str:
    if name == "text_projection":
        return name
    match = _TEXT_ENCODER_MODULE.match(name)
    if match is None:
        raise KeyError(name)
    layer, group, leaf = match.groups()
    return f"text_model.encoder.layers.{layer}.{group}.{leaf}"


def _peft_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's `lora_alpha / r` for `module` (alpha_pattern honoured), or `/ sqrt(r)` with rsLoRA."""
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _adapter_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The per-component LoRA configs diffusers stores as `unet.lora_alpha`, `text_encoder.r`, ..."""
    flat = json.loads(metadata["lora_adapter_metadata"]) if "lora_adapter_metadata" in metadata else {}
    configs: dict[str, dict[str, Any]] = {component: {} for component in COMPONENTS}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if component in configs:
            configs[component][field] = value
    return configs


def _split_diffusers_key(key: str) -> tuple[str, str, str]:
    """`unet.<module>.lora_A.weight` -> ("unet", module, "down")."""
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        raise ModelError(
            f"LoRA key {key} is for no SDXL part (unet, text_encoder, text_encoder_2)",
            hint="this does not look like an SDXL LoRA in diffusers format",
        )
    for suffix, matrix in _DIFFUSERS_SUFFIXES:
        if rest.endswith(suffix):
            return component, rest[: -len(suffix)], matrix
    raise ModelError(
        f"LoRA key {key} is not a LoRA down/up weight",
        hint="only plain LoRA converts (not DoRA, LoHa or LoKr)",
    )


def diffusers_to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    unet_config: Mapping[str, Any] | None = None,
    title: str = "",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Convert a diffusers/PEFT SDXL LoRA to kohya tensors and header; alpha is `scale * rank` per module."""
    to_kohya = {module: name for name, module in unet_kohya_names(unet_config).items()}
    configs = _adapter_configs(metadata)
    network_alphas = {
        key.removesuffix(".alpha"): value for key, value in state_dict.items() if key.endswith(".alpha")
    }
    kohya: dict[str, torch.Tensor] = {}
    ranks: Counter[tuple[int, float]] = Counter()
    for key, tensor in state_dict.items():
        if key.endswith(".alpha"):
            continue
        component, module, matrix = _split_diffusers_key(key)
        if component == "unet":
            if module not in to_kohya:
                raise ModelError(
                    f"UNet module {module} has no counterpart in the original SDXL UNet",
                    hint="pass the base model the adapter was trained on (--base)",
                )
            name = to_kohya[module]
        else:
            name = KOHYA_PREFIXES[component] + module.replace(".", "_")
        kohya[f"{name}.lora_{matrix}.weight"] = tensor
        if matrix == "down":
            rank = tensor.shape[0]
            old_alpha = network_alphas.get(f"{component}.{module}")
            if old_alpha is not None:  # the older diffusers format stores kohya-style alphas
                alpha = float(old_alpha)
            elif configs[component]:
                alpha = _peft_scale(configs[component], module, rank) * rank
            else:  # without metadata diffusers loads at alpha == rank
                alpha = float(rank)
            kohya[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            ranks[(rank, alpha)] += 1
    if not ranks:
        raise ModelError("the LoRA file holds no LoRA weights", hint="check the file")
    (dim, alpha), _ = ranks.most_common(1)[0]
    header = {
        **{key: value for key, value in metadata.items() if key.startswith("tuner.")},
        **KOHYA_METADATA,
        "ss_network_dim": str(dim),
        "ss_network_alpha": _number(alpha),
        "modelspec.title": title,
    }
    return kohya, header


def kohya_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """kohya tensors -> ({component: PEFT state dict}, {component: LoRA config}) for save_lora_weights."""
    from peft import LoraConfig

    unet_modules = unet_kohya_names(unet_config)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    module_ranks: dict[str, dict[str, tuple[int, float]]] = {}
    for key, tensor in state_dict.items():
        name, _, kind = key.partition(".")
        if kind == "alpha":
            continue
        if kind not in ("lora_down.weight", "lora_up.weight"):
            raise ModelError(
                f"kohya key {key} is not a plain LoRA weight",
                hint="only plain LoRA converts (not LoHa, LoKr or DoRA)",
            )
        component = next((c for c, prefix in KOHYA_PREFIXES.items() if name.startswith(prefix)), None)
        try:
            if component == "unet":
                module = unet_modules[name]
            elif component is not None:
                module = _kohya_text_encoder_module(name.removeprefix(KOHYA_PREFIXES[component]))
            else:
                raise KeyError(name)
        except KeyError:
            raise ModelError(
                f"kohya module {name} is not a module of SDXL",
                hint="only SDXL LoRAs (lora_unet_, lora_te1_, lora_te2_) convert",
            ) from None
        matrix = "A" if kind == "lora_down.weight" else "B"
        layers.setdefault(component, {})[f"{module}.lora_{matrix}.weight"] = tensor
        if matrix == "A":
            rank = tensor.shape[0]
            alpha_tensor = state_dict.get(f"{name}.alpha")
            alpha = float(alpha_tensor) if alpha_tensor is not None else float(rank)
            module_ranks.setdefault(component, {})[module] = (rank, alpha)
    configs = {}
    for component, modules in module_ranks.items():
        (rank, alpha), _ = Counter(modules.values()).most_common(1)[0]
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=sorted(modules),
            rank_pattern={module: r for module, (r, _) in modules.items() if r != rank},
            alpha_pattern={module: a for module, (_, a) in modules.items() if a != alpha},
        )
        configs[component] = config.to_dict()
    return layers, configs


def export_kohya(
    adapter: Path, output_file: Path, unet_config: Mapping[str, Any] | None = None, title: str | None = None
) -> Path:
    """Write `adapter` (tuner's folder or diffusers file) as a kohya LoRA `.safetensors` file."""
    source = resolve_adapter_file(adapter)
    state_dict, metadata = read_safetensors(source)
    if is_kohya(state_dict):
        raise ModelError(f"{source} is already in kohya format", hint="use --to diffusers to convert it back")
    tensors, header = diffusers_to_kohya(
        state_dict, metadata, unet_config, title=title or Path(output_file).stem
    )
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(output_file), metadata=header)
    return output_file


def import_kohya(kohya_file: Path, output_dir: Path, unet_config: Mapping[str, Any] | None = None) -> Path:
    """Write a kohya SDXL LoRA as a diffusers adapter folder (what `load_lora_weights(folder)` reads)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    state_dict, metadata = read_safetensors(Path(kohya_file))
    if not is_kohya(state_dict):
        raise ModelError(f"{kohya_file} is not a kohya LoRA", hint="use --to kohya to convert it")
    layers, configs = kohya_to_diffusers(state_dict, unet_config)
    arguments: dict[str, Any] = {}
    for component, tensors in layers.items():
        # As save_sdxl_lora writes them: PEFT names for the UNet, diffusers' for the text encoders.
        arguments[f"{component}_lora_layers"] = (
            tensors if component == "unet" else convert_state_dict_to_diffusers(tensors)
        )
        arguments[f"{component}_lora_adapter_metadata"] = configs[component]
    output_dir = Path(output_dir)
    StableDiffusionXLPipeline.save_lora_weights(output_dir, weight_name=DIFFUSERS_ADAPTER_FILE, **arguments)
    path = output_dir / DIFFUSERS_ADAPTER_FILE
    carried = {key: value for key, value in metadata.items() if key.startswith("tuner.")}
    if carried:
        tensors_written, header = read_safetensors(path)
        save_file(tensors_written, str(path), metadata={**header, **carried})
    return path


def resolve_adapter_file(adapter: Path) -> Path:
    """The `.safetensors` file of an adapter given as a file or as tuner's output folder."""
    adapter = Path(adapter)
    if adapter.is_dir():
        candidate = adapter / DIFFUSERS_ADAPTER_FILE
        if candidate.is_file():
            return candidate
        files = sorted(adapter.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise ModelError(
            f"no single LoRA file in {adapter} (looked for {DIFFUSERS_ADAPTER_FILE})",
            hint="pass the .safetensors file itself",
        )
    if not adapter.is_file():
        raise ModelError(f"adapter {adapter} does not exist", hint="pass a LoRA folder or .safetensors file")
    return adapter


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
