"""SDXL LoRA files: tuner's diffusers/PEFT layout <-> the kohya layout (sd-scripts, ComfyUI, A1111/Forge).

kohya names a module by its path in the *original* SDXL UNet with `_` for `.`
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), `lora_te1_` / `lora_te2_` for the
CLIP-L and bigG text encoders, and stores `.lora_down.weight`, `.lora_up.weight` and `.alpha` per
module; the applied scale is `alpha / rank`. diffusers stores PEFT's `lora_A`/`lora_B` (or its older
`lora.down`/`lora.up`) and keeps rank and alpha in the `lora_adapter_metadata` header, where PEFT's
scale is `lora_alpha / r` (`/ sqrt(r)` with rsLoRA). Conversion keeps each module's effective scale.

Text-encoder names always carry the `text_model` level
(`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`), as kohya, A1111/Forge and ComfyUI read them:
transformers 5 saves `CLIPTextModel` without that level, and an export that inherited it would be
dropped by those tools ("lora key not loaded").

DoRA (PEFT's `lora_magnitude_vector`, one magnitude per output channel) is written as LyCORIS'
`dora_scale` with the output-channel shape `(out, 1[, 1, 1])`. ComfyUI and Forge (comfy/weight_adapter
`weight_decompose`) apply an output-axis `dora_scale` as `(W + delta) * dora_scale / ||W||`, with the
norm of the *base* weight, where PEFT (and LyCORIS) divide by `||W + delta||`; the export therefore
stores `m * ||W|| / ||W + delta||`, which needs the base weights and makes those tools' result equal
PEFT's at strength 1. diffusers drops `dora_scale` from SDXL kohya files (0.42 warns and loads plain
LoRA), so the diffusers file is the one to load there.

UNet names depend on the UNet's block layout. Without a UNet config the layout is SDXL base's, and that is
only assumed when every adapted module exists in SDXL base with the shapes the LoRA matrices have;
anything else is refused rather than renamed wrongly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from tuner.atomic import give_default_modes, write_atomically
from tuner.config.load import RESOLVED_CONFIG_NAME
from tuner.errors import ConfigError, ModelError, TunerError
from tuner.formats.sdxl_unet_layout import UNetLayout

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
COMPONENTS = tuple(KOHYA_PREFIXES)
DIFFUSERS_ADAPTER_FILE = "pytorch_lora_weights.safetensors"
# (component, diffusers module) -> that module's frozen base weight: what a DoRA export needs.
BaseWeight = Callable[[str, str], torch.Tensor]

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
    (".lora_magnitude_vector", "magnitude"),
    (".lora_magnitude_vector.weight", "magnitude"),  # text encoders (see save_sdxl_lora)
)
# The tensors of PEFT's LoKr and LoHa layers, named as LyCORIS (and so ComfyUI, A1111, Forge) name them.
LYCORIS_TENSORS = (
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
)
_MAGNITUDE_SUFFIXES = tuple(suffix for suffix, matrix in _DIFFUSERS_SUFFIXES if matrix == "magnitude")
# `text_model_` is optional on reading: tuner before 0.x wrote CLIP-L keys without it.
_TEXT_ENCODER_MODULE = re.compile(r"^(?:text_model_)?encoder_layers_(\d+)_(self_attn|mlp)_(\w+)$")
LAYOUT_HINT = "pass the base model the adapter was trained on (--base)"


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


def refuse_kohya_only_dora(save_format: str, variant: str) -> None:
    """Refuse, before training, a DoRA run that would keep only the kohya file: diffusers (0.42) drops its
    `dora_scale` and loads it as plain LoRA (other images than the adapter trained for), so `tuner infer`,
    `tuner eval` and diffusers users need the diffusers file beside it."""
    if save_format == "kohya" and variant == "dora":
        raise ConfigError(
            "output.save_format=kohya with lora.variant=dora would keep only the kohya file, which diffusers "
            "(and so tuner infer/eval) loads as plain LoRA: it drops dora_scale",
            hint="use output.save_format=both (the kohya file for ComfyUI/A1111/Forge, the diffusers file "
            "for diffusers and tuner), or diffusers",
        )


def is_dora(adapter_file: Path) -> bool:
    """Whether a diffusers/PEFT LoRA file carries DoRA magnitudes."""
    with safe_open(str(adapter_file), framework="pt") as handle:
        return any(key.endswith(_MAGNITUDE_SUFFIXES) for key in handle.keys())  # noqa: SIM118


@functools.cache
def _unet_modules(config_json: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """diffusers module name -> (kohya name, weight shape), for every Linear/Conv2d a LoRA can adapt."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(config_json))
    layout = UNetLayout(unet.config)
    return {
        name: (
            KOHYA_PREFIXES["unet"] + layout.to_original(name).replace(".", "_"),
            tuple(module.weight.shape),
        )
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }


def _config_json(unet_config: Mapping[str, Any] | None) -> str:
    config = dict(unet_config if unet_config is not None else SDXL_BASE_UNET_CONFIG)
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    return json.dumps(config, sort_keys=True)


def unet_kohya_names(unet_config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """kohya name -> diffusers module name for a UNet config (SDXL base's by default)."""
    return {kohya: name for name, (kohya, _) in _unet_modules(_config_json(unet_config)).items()}


def unet_lora_misfit(
    modules: Mapping[str, tuple[torch.Size, torch.Size]], unet_config: Mapping[str, Any] | None = None
) -> str | None:
    """The first UNet module whose LoRA (down, up) shapes the UNet has no weight for, or None if all fit.

    A LoRA fits a weight of shape `(out, in, ...)` when `down` reads `in` channels and `up` writes `out`.
    """
    weights = _unet_modules(_config_json(unet_config))
    for module, (down, up) in modules.items():
        shape = weights.get(module, (None, None))[1]
        if shape is None or down[1] != shape[1] or up[0] != shape[0]:
            return module
    return None


def kohya_text_encoder_name(component: str, module: str) -> str:
    """`text_encoder`, `encoder.layers.0.self_attn.q_proj` -> `lora_te1_text_model_encoder_layers_0_...`."""
    if not module.startswith(("text_model.", "text_projection")):
        module = f"text_model.{module}"
    return KOHYA_PREFIXES[component] + module.replace(".", "_")


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
        hint="only LoRA and DoRA convert (not LoHa or LoKr)",
    )


def diffusers_to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    unet_config: Mapping[str, Any] | None = None,
    title: str = "",
    source: str = "the adapter",
    base_weight: BaseWeight | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Convert a diffusers/PEFT SDXL LoRA to kohya tensors and header; alpha is `scale * rank` per module.

    `unet_config` is the base's UNet config; None means SDXL base's layout, checked against the shapes.
    A DoRA adapter needs `base_weight` (see the module docstring).
    """
    if any(key.rpartition(".")[2] in LYCORIS_TENSORS for key in state_dict):
        return _lycoris_to_kohya(state_dict, metadata, unet_config, title, source)
    to_kohya = {module: name for name, module in unet_kohya_names(unet_config).items()}
    configs = _adapter_configs(metadata)
    network_alphas = {
        key.removesuffix(".alpha"): value for key, value in state_dict.items() if key.endswith(".alpha")
    }
    kohya: dict[str, torch.Tensor] = {}
    ranks: Counter[tuple[int, float]] = Counter()
    split = {key: _split_diffusers_key(key) for key in state_dict if not key.endswith(".alpha")}
    magnitudes = {
        (component, module): state_dict[key]
        for key, (component, module, matrix) in split.items()
        if matrix == "magnitude"
    }
    split = {key: parts for key, parts in split.items() if parts[2] != "magnitude"}
    if magnitudes and base_weight is None:
        raise ModelError(
            f"{source} is a DoRA adapter: its kohya file needs the base model's weights",
            hint=LAYOUT_HINT,
        )
    if unet_config is None:
        _check_sdxl_base_layout(
            {
                (module, matrix): state_dict[key]
                for key, (component, module, matrix) in split.items()
                if component == "unet"
            },
            source,
        )
    for key, (component, module, matrix) in split.items():
        tensor = state_dict[key]
        if component == "unet":
            if module not in to_kohya:
                raise ModelError(
                    f"UNet module {module} has no counterpart in the original SDXL UNet", hint=LAYOUT_HINT
                )
            name = to_kohya[module]
        else:
            name = kohya_text_encoder_name(component, module)
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
    for (component, module), magnitude in magnitudes.items():
        name = to_kohya[module] if component == "unet" else kohya_text_encoder_name(component, module)
        kohya[f"{name}.dora_scale"] = comfy_dora_scale(
            base_weight(component, module),
            kohya[f"{name}.lora_down.weight"],
            kohya[f"{name}.lora_up.weight"],
            float(kohya[f"{name}.alpha"]) / kohya[f"{name}.lora_down.weight"].shape[0],
            magnitude,
        )
    (dim, alpha), _ = ranks.most_common(1)[0]
    header = _kohya_header(metadata, dim, alpha, title)
    if magnitudes:
        # How LyCORIS (which kohya's sd-scripts trains DoRA with) marks a DoRA file.
        header["ss_network_module"] = "lycoris.kohya"
        header["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True"})
    return kohya, header


# tuner's run record (`tuner.*`, written by the recipe) -> the kohya / modelspec keys ComfyUI, A1111 and
# Forge show in their LoRA metadata views (sd-scripts' names).
_RECORD_TO_KOHYA = {
    "base_model": ("ss_sd_model_name",),
    "base_model_hash": ("ss_sd_model_hash",),
    "base_model_sha256": ("ss_new_sd_model_hash",),
    "steps": ("ss_steps", "ss_max_train_steps"),
    "epochs": ("ss_epoch", "ss_num_epochs"),
    "images": ("ss_num_train_images",),
    # Instance samples per epoch, repeats counted (kohya's count); files before repeats record only images.
    "train_samples": ("ss_num_train_images",),
    "reg_samples": ("ss_num_reg_images",),
    "dataset_dirs": ("ss_dataset_dirs",),
    "reg_dataset_dirs": ("ss_reg_dataset_dirs",),
    "tag_frequency": ("ss_tag_frequency",),
    "caption_prefix": ("modelspec.trigger_phrase",),
    "masked_loss": ("ss_masked_loss",),
    "zero_terminal_snr": ("ss_zero_terminal_snr",),
    "huber_c": ("ss_huber_c",),
    "huber_schedule": ("ss_huber_schedule",),
    # The LoRA the run started from (`lora.init_adapter`, kohya's --network_weights), by file name.
    "init_adapter": ("ss_network_weights",),
}
# kohya names the squared error `l2`.
_KOHYA_LOSS_TYPES = {"mse": "l2", "huber": "huber", "smooth_l1": "smooth_l1"}


def base_model_hashes(base_model: str) -> dict[str, str]:
    """`{"base_model_hash", "base_model_sha256"}` of a single-file base, as kohya's sd-scripts records them
    (`ss_sd_model_hash`, `ss_new_sd_model_hash`: library/train_util.py `model_hash`, A1111's old short hash
    of 64 KiB at offset 1 MiB, and `calculate_sha256` of the whole file), so A1111 and the tools that read
    those keys can match the LoRA to its checkpoint. A folder or hub ID has no such hash (sd-scripts writes
    "IsADirectory" there): nothing is recorded for them."""
    path = Path(base_model)
    if not path.is_file():
        return {}
    short, whole = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(0x100000)
        short.update(file.read(0x10000))
        file.seek(0)
        for block in iter(lambda: file.read(1 << 20), b""):
            whole.update(block)
    return {"base_model_hash": short.hexdigest()[:8], "base_model_sha256": whole.hexdigest()}


def _kohya_header(metadata: Mapping[str, str], dim: int, alpha: float, title: str) -> dict[str, str]:
    header = {
        **{key: value for key, value in metadata.items() if key.startswith("tuner.")},
        **KOHYA_METADATA,
        "ss_network_dim": str(dim),
        "ss_network_alpha": _number(alpha),
        "modelspec.title": title,
    }
    for record, keys in _RECORD_TO_KOHYA.items():
        if metadata.get(f"tuner.{record}"):
            header.update(dict.fromkeys(keys, metadata[f"tuner.{record}"]))
    if metadata.get("tuner.resolution"):
        side = metadata["tuner.resolution"]
        header["ss_resolution"] = f"({side}, {side})"
        header["modelspec.resolution"] = f"{side}x{side}"
    if metadata.get("tuner.loss"):
        header["ss_loss_type"] = _KOHYA_LOSS_TYPES[metadata["tuner.loss"]]
    if metadata.get("tuner.max_caption_tokens"):
        # kohya records None for one 75-token window (its --max_token_length unset).
        tokens = metadata["tuner.max_caption_tokens"]
        header["ss_max_token_length"] = "None" if tokens == "75" else tokens
    if metadata.get("tuner.prediction_type") == "v_prediction":
        # How kohya's sd-scripts mark a v-prediction LoRA, so kohya-based tools sample it right.
        header["ss_v_parameterization"] = "True"
    return header


def _lycoris_to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    unet_config: Mapping[str, Any] | None,
    title: str,
    source: str,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoKr/LoHa adapter (PEFT's tensor names, LyCORIS' too) under kohya module names.

    PEFT scales both deltas by `alpha / r`. ComfyUI, Forge and A1111 scale LoHa by `alpha / dim` with
    `dim` the rank of `hada_w1_b`, so LoHa keeps `alpha = scale * rank`; they scale LoKr by `alpha / dim`
    only when a factor is decomposed (and by 1 when both are full, whatever the alpha), so LoKr's scale is
    folded into its first factor and no `.alpha` is written.
    """
    if unet_config is None:
        raise ModelError(
            f"cannot tell the UNet layout of {source}: it records no readable base model", hint=LAYOUT_HINT
        )
    to_kohya = {module: name for name, module in unet_kohya_names(unet_config).items()}
    configs = _adapter_configs(metadata)
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        module, _, tensor_name = rest.rpartition(".")
        if component not in COMPONENTS or tensor_name not in LYCORIS_TENSORS:
            raise ModelError(
                f"key {key} in {source} is not a LoKr/LoHa weight of an SDXL part", hint="check the file"
            )
        modules.setdefault((component, module), {})[tensor_name] = tensor
    kohya: dict[str, torch.Tensor] = {}
    algorithm = "lokr"
    for (component, module), tensors in modules.items():
        if component == "unet":
            if module not in to_kohya:
                raise ModelError(
                    f"UNet module {module} of {source} is not in the base's UNet", hint=LAYOUT_HINT
                )
            name = to_kohya[module]
        else:
            name = kohya_text_encoder_name(component, module)
        config = configs[component]
        scale = float(config["alpha"]) / int(config["r"])
        if "hada_w1_b" in tensors:
            algorithm = "loha"
            kohya[f"{name}.alpha"] = torch.tensor(scale * tensors["hada_w1_b"].shape[0], dtype=torch.float32)
        else:
            first = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
            tensors = {**tensors, first: tensors[first] * scale}
        kohya.update({f"{name}.{tensor_name}": tensor for tensor_name, tensor in tensors.items()})
    unet = configs["unet"] or next(config for config in configs.values() if config)
    header = _kohya_header(metadata, int(unet["r"]), float(unet["alpha"]), title)
    header["ss_network_module"] = "lycoris.kohya"
    header["ss_network_args"] = json.dumps({"algo": algorithm})
    return kohya, header


def comfy_dora_scale(
    weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """The output-axis `dora_scale` with which ComfyUI/Forge compute PEFT's DoRA weight.

    PEFT: `W' = m / ||W + delta|| * (W + delta)` per output channel. ComfyUI/Forge: `W' = (W + delta) *
    dora_scale / ||W||`. So `dora_scale = m * ||W|| / ||W + delta||`, shaped `(out, 1, ...)` like `W`.
    """
    weight = weight.float()
    delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape) * scale
    rows = weight.shape[0]
    norm = weight.reshape(rows, -1).norm(dim=1)
    adapted_norm = (weight + delta).reshape(rows, -1).norm(dim=1)
    dora_scale = magnitude.float().flatten() * norm / adapted_norm
    return dora_scale.reshape(rows, *[1] * (weight.dim() - 1))


def kohya_to_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any] | None = None,
    source: str = "the kohya file",
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """kohya tensors -> ({component: PEFT state dict}, {component: LoRA config}) for save_lora_weights."""
    from peft import LoraConfig

    unet_modules = unet_kohya_names(unet_config)
    unet_matrices: dict[tuple[str, str], torch.Tensor] = {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    module_ranks: dict[str, dict[str, tuple[int, float]]] = {}
    for key, tensor in state_dict.items():
        name, _, kind = key.partition(".")
        if kind == "alpha":
            continue
        if kind not in ("lora_down.weight", "lora_up.weight"):
            raise ModelError(
                f"kohya key {key} is not a plain LoRA weight",
                hint="only plain LoRA converts back (not LoHa or LoKr; a DoRA dora_scale depends on the "
                "base weights: keep tuner's diffusers file)",
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
            if component == "unet":
                base = "SDXL base's UNet" if unet_config is None else "the base's UNet"
                message = f"kohya module {name} in {source} is not in {base}"
                raise ModelError(message, hint=LAYOUT_HINT) from None
            raise ModelError(
                f"kohya module {name} in {source} is not a module of SDXL",
                hint="only SDXL LoRAs (lora_unet_, lora_te1_, lora_te2_) convert",
            ) from None
        matrix = "A" if kind == "lora_down.weight" else "B"
        if component == "unet":
            unet_matrices[(module, "down" if matrix == "A" else "up")] = tensor
        layers.setdefault(component, {})[f"{module}.lora_{matrix}.weight"] = tensor
        if matrix == "A":
            rank = tensor.shape[0]
            alpha_tensor = state_dict.get(f"{name}.alpha")
            alpha = float(alpha_tensor) if alpha_tensor is not None else float(rank)
            module_ranks.setdefault(component, {})[module] = (rank, alpha)
    if unet_config is None:
        _check_sdxl_base_layout(unet_matrices, source)
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


def lora_deltas(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    unet_config: Mapping[str, Any] | None = None,
    source: str = "the adapter",
) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]]:
    """(component, diffusers module) -> (down, up, alpha / rank, DoRA magnitude or None) for a diffusers
    or kohya SDXL LoRA.

    Both layouts go through the kohya one, where each module carries its own alpha, so PEFT's
    alpha/rank patterns and rsLoRA are resolved by the same code as `tuner convert`. DoRA magnitudes
    are PEFT's (`lora_magnitude_vector` of a diffusers file); they bypass the kohya layout, whose
    `dora_scale` depends on the base weights.
    """
    kohya = dict(state_dict)
    magnitudes: dict[tuple[str, str], torch.Tensor] = {}
    if not is_kohya(kohya):
        for key in [key for key in state_dict if key.endswith(_MAGNITUDE_SUFFIXES)]:
            component, module, _ = _split_diffusers_key(key)
            magnitudes[(component, module)] = state_dict[key]
        plain = {key: value for key, value in state_dict.items() if not key.endswith(_MAGNITUDE_SUFFIXES)}
        kohya, _ = diffusers_to_kohya(plain, metadata, unet_config, source=source)
    layers, _ = kohya_to_diffusers(kohya, unet_config, source=source)
    deltas = {}
    for component, tensors in layers.items():
        for key, down in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removesuffix(".lora_A.weight")
            name = (
                _unet_modules(_config_json(unet_config))[module][0]
                if component == "unet"
                else kohya_text_encoder_name(component, module)
            )
            alpha = kohya.get(f"{name}.alpha")
            rank = down.shape[0]
            scale = float(alpha) / rank if alpha is not None else 1.0
            magnitude = magnitudes.get((component, module))
            if magnitude is None and component != "unet":  # diffusers files name CLIP-L both ways
                magnitude = magnitudes.get((component, module.removeprefix("text_model.")))
            deltas[(component, module)] = (down, tensors[f"{module}.lora_B.weight"], scale, magnitude)
    return deltas


def _check_sdxl_base_layout(matrices: Mapping[tuple[str, str], torch.Tensor], source: str) -> None:
    """Refuse to name UNet modules after SDXL base's layout unless the LoRA shapes say it is SDXL base's.

    `matrices` maps (diffusers module, "down"/"up") to tensors. Another layout (say, two layers per
    block where SDXL has three, or other widths) would be renamed to wrong but existing-looking names.
    """
    modules = {
        module: (matrices[(module, "down")].shape, matrices[(module, "up")].shape)
        for module, matrix in matrices
        if matrix == "down" and (module, "up") in matrices
    }
    misfit = unet_lora_misfit(modules)
    if misfit is not None:
        raise ModelError(
            f"cannot tell the UNet layout of {source}: it records no readable base model, and its LoRA at "
            f"{misfit} does not fit SDXL base",
            hint=LAYOUT_HINT,
        )


def export_kohya(
    adapter: Path,
    output_file: Path,
    unet_config: Mapping[str, Any] | None = None,
    title: str | None = None,
    base_weight: BaseWeight | None = None,
) -> Path:
    """Write `adapter` (tuner's folder or diffusers file) as a kohya LoRA `.safetensors` file.

    A DoRA adapter needs `base_weight`, the base model's frozen weights (see the module docstring).
    """
    source = resolve_adapter_file(adapter)
    state_dict, metadata = read_safetensors(source)
    if is_kohya(state_dict):
        raise ModelError(f"{source} is already in kohya format", hint="use --to diffusers to convert it back")
    if unet_config is None:
        unet_config = recorded_unet_config(source, metadata)
    tensors, header = diffusers_to_kohya(
        state_dict,
        metadata,
        unet_config,
        title=title or Path(output_file).stem,
        source=str(source),
        base_weight=base_weight,
    )
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {key: value.contiguous() for key, value in tensors.items()}
    return write_atomically(output_file, lambda path: save_file(contiguous, str(path), metadata=header))


def import_kohya(kohya_file: Path, output_dir: Path, unet_config: Mapping[str, Any] | None = None) -> Path:
    """Write a kohya SDXL LoRA as a diffusers adapter folder (what `load_lora_weights(folder)` reads)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    state_dict, metadata = read_safetensors(Path(kohya_file))
    if not is_kohya(state_dict):
        raise ModelError(f"{kohya_file} is not a kohya LoRA", hint="use --to kohya to convert it")
    if unet_config is None:
        unet_config = recorded_unet_config(Path(kohya_file), metadata)
    layers, configs = kohya_to_diffusers(state_dict, unet_config, source=str(kohya_file))
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
    give_default_modes(path)  # safetensors 0.8 writes it private (0600)
    return path


def base_unet_config(base: str) -> dict[str, Any]:
    """The UNet config of an SDXL base model (hub ID, diffusers folder, `tiny`/`tiny-sdxl`)."""
    from diffusers import UNet2DConditionModel

    from tuner.tiny import resolve_model_path

    return dict(UNet2DConditionModel.load_config(resolve_model_path(base, "sdxl-lora"), subfolder="unet"))


def recorded_base(adapter_file: Path, metadata: Mapping[str, str]) -> str | None:
    """The base model an adapter records: its `tuner.base_model` header, else the run's tuner_config.yaml."""
    if metadata.get("tuner.base_model"):
        return metadata["tuner.base_model"]
    config_file = Path(adapter_file).parent / RESOLVED_CONFIG_NAME
    if not config_file.is_file():
        return None
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return None
    return ((config.get("model") or {}).get("name_or_path")) or None


def recorded_unet_config(adapter_file: Path, metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The UNet config of the base `adapter_file` records, or None when none is recorded or readable.

    None leaves the layout to the LoRA shapes (SDXL base's when they fit it, else a refusal).
    """
    base = recorded_base(adapter_file, metadata)
    if base is None:
        return None
    try:
        return base_unet_config(base)
    except (OSError, ValueError, TunerError):  # not downloaded, offline, a single file without a config
        return None


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
