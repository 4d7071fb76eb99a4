"""LoRA on SDXL: which layers get adapters, injecting them through PEFT, and saving them for diffusers.

Target sets for the UNet, named by what they adapt (combine them with `+`, or list them):

* `attention` (default): the attention projections `to_q`, `to_k`, `to_v`, `to_out.0`, as the
  diffusers SDXL LoRA example does; self- and cross-attention alike.
* `ffn`: the transformer blocks' feed-forward layers `ff.net.0.proj` (GEGLU input) and `ff.net.2`.
* `conv`: the ResNet blocks' 3x3 `conv1`/`conv2`, their 1x1 `conv_shortcut` where channels change, and
  `time_emb_proj` (how each block sees the timestep), i.e. everything in the blocks that is not
  attention or normalisation; what kohya calls LoCon. The stem and head convolutions (`conv_in`,
  `conv_out`) and the up/down samplers stay frozen: they set the latent layout, not the style.

The optional text-encoder LoRA adapts both CLIP encoders' `q_proj`, `k_proj`, `v_proj`, `out_proj`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, get_peft_config, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from tuner.atomic import give_default_modes
from tuner.config.schema import LORA_INIT_WEIGHTS
from tuner.errors import ConfigError, ModelError

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
EMA_ADAPTER_FILE = "pytorch_lora_weights_ema.safetensors"
# The kohya-layout copy (tuner.formats.kohya) for ComfyUI, A1111/Forge and sd-scripts.
KOHYA_ADAPTER_FILE = "pytorch_lora_weights_kohya.safetensors"

UNET_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "ffn": ("ff.net.0.proj", "ff.net.2"),
    "conv": ("conv1", "conv2", "conv_shortcut", "time_emb_proj"),
}
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# LyCORIS' algorithms as PEFT implements them. diffusers loads neither (its loaders build LoRA configs
# only), so tuner loads them itself (`load_adapter_file`) and the kohya file is what other tools read.
LYCORIS_CONFIGS: dict[str, type[PeftConfig]] = {"lokr": LoKrConfig, "loha": LoHaConfig}


def unet_target_modules(targets: list[str]) -> list[str]:
    """Module names for `targets` (`attention`, `attention+ffn`, ...); an empty list means `attention`."""
    groups = [part.strip() for target in targets or ["attention"] for part in target.split("+")]
    unknown = [group for group in groups if group not in UNET_TARGET_GROUPS]
    if unknown:
        raise ConfigError(
            f"unknown SDXL LoRA target {unknown[0]!r} in lora.targets",
            hint="use attention, attention+ffn or attention+ffn+conv",
        )
    return [name for group in UNET_TARGET_GROUPS if group in groups for name in UNET_TARGET_GROUPS[group]]


def lora_config(
    target_modules: list[str] | tuple[str, ...],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    init: str = "default",
    use_rslora: bool = False,
    variant: str = "lora",
) -> PeftConfig:
    """PEFT's LoRA config; `variant="dora"` adds DoRA's magnitude vectors (`use_dora`), `lokr`/`loha` are
    PEFT's LoKrConfig/LoHaConfig (LyCORIS' LoKr and LoHa, delta scaled by alpha / rank as LoRA's)."""
    if variant in LYCORIS_CONFIGS:
        options = {"dropout": dropout, "init": init, "use_rslora": use_rslora}
        changed = {key: value for key, value in options.items() if value not in (0.0, "default", False)}
        if changed:
            key, value = next(iter(changed.items()))
            raise ConfigError(
                f"lora.{key}={value!r} does not apply to lora.variant {variant}",
                hint=f"leave lora.{key} at its default with LoKr/LoHa",
            )
        return LYCORIS_CONFIGS[variant](r=rank, alpha=alpha, target_modules=list(target_modules))
    if init not in LORA_INIT_WEIGHTS:
        raise ConfigError(
            f"lora.init {init!r} is not available for SDXL",
            hint="use default or gaussian (initialisations that rewrite the base weights cannot be saved "
            "as a diffusers LoRA)",
        )
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights=LORA_INIT_WEIGHTS[init],
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        use_dora=variant == "dora",
    )


def add_lora(model: torch.nn.Module, config: LoraConfig) -> list[torch.nn.Parameter]:
    """Inject `config`'s adapter into a diffusers UNet or transformers text encoder; returns its parameters.

    The adapter parameters are kept in fp32 even when the frozen weights are half precision, so
    optimizer updates are not rounded away (as `diffusers.training_utils.cast_training_params` does).
    """
    model.add_adapter(config)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in parameters:
        parameter.data = parameter.data.float()
    return parameters


def has_lora(model: torch.nn.Module | None) -> bool:
    return model is not None and bool(getattr(model, "peft_config", None))


def save_sdxl_lora(
    output_dir: Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
    *,
    weight_name: str = ADAPTER_FILE,
    training_metadata: dict[str, str] | None = None,
) -> Path:
    """Write the adapters as diffusers' `save_lora_weights` does, with tuner's run facts in the header.

    UNet keys keep PEFT's `lora_A`/`lora_B` names. `convert_state_dict_to_diffusers` (diffusers 0.42)
    renames only attention layers to the older `.lora.down`/`.lora.up`, so with `ffn` or `conv` targets
    the file mixes both namings, `load_lora_weights` takes it for PEFT format and silently drops every
    attention adapter. Text-encoder keys are all renamed consistently, so they use diffusers' naming.

    The LoRA configs go in as `*_lora_adapter_metadata`, so `load_lora_weights` rebuilds the same rank
    and alpha (without them diffusers assumes alpha == rank and an adapter trained with another alpha
    loads at the wrong strength). `training_metadata` is added to the safetensors header as
    `tuner.<key>` entries.
    """
    layers: dict[str, object] = {}
    for name, model in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if not has_lora(model):
            continue
        # No embedding layers are adapted; "auto" would look the base config up (a hub call for hub IDs).
        state_dict = get_peft_model_state_dict(model, save_embedding_layers=False)
        # LoKr/LoHa keys keep PEFT's (and LyCORIS') names: diffusers has no naming of its own for them.
        if name != "unet" and model.peft_config["default"].peft_type == "LORA":
            state_dict = {
                # PEFT saves DoRA magnitudes without `.weight`; transformers 5.23's adapter loading
                # (diffusers' text-encoder path) renames keys but never adds it back, and would leave
                # every magnitude at its fresh initialisation.
                key + ".weight" if key.endswith(".lora_magnitude_vector") else key: value
                for key, value in convert_state_dict_to_diffusers(state_dict).items()
            }
        layers[f"{name}_lora_layers"] = state_dict
        layers[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    StableDiffusionXLPipeline.save_lora_weights(output_dir, weight_name=weight_name, **layers)
    path = Path(output_dir) / weight_name
    if training_metadata:
        _add_header_metadata(path, {f"tuner.{key}": str(value) for key, value in training_metadata.items()})
    return give_default_modes(path)  # safetensors 0.8 writes it private (0600)


def _add_header_metadata(path: Path, extra: dict[str, str]) -> None:
    # safetensors has no in-place header edit; adapter files are small enough to rewrite.
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    metadata.update(extra)
    save_file(tensors, str(path), metadata=metadata)


def read_adapter_metadata(path: Path) -> dict[str, object]:
    """The header of a saved adapter: `tuner.*` entries as strings, diffusers' LoRA configs decoded."""
    with safe_open(str(path), framework="pt") as handle:
        metadata: dict[str, object] = dict(handle.metadata() or {})
    if "lora_adapter_metadata" in metadata:
        metadata["lora_adapter_metadata"] = json.loads(str(metadata["lora_adapter_metadata"]))
    return metadata


def is_lycoris(metadata: dict[str, str]) -> bool:
    """Whether an adapter file's header records a LoKr or LoHa config (diffusers cannot load those)."""
    configs = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    return any(key.endswith(".peft_type") and value in ("LOKR", "LOHA") for key, value in configs.items())


def load_adapter_file(pipeline: StableDiffusionXLPipeline, adapter_file: Path, adapter_name: str) -> None:
    """Load a LoRA/DoRA file (diffusers' `load_lora_weights`: diffusers, PEFT or kohya layout) or one of
    tuner's LoKr/LoHa files (through PEFT: the config in the header, injected as `adapter_name`, so
    diffusers' `set_adapters`, `disable_lora` and `fuse_lora` act on it like on a LoRA)."""
    adapter_file = Path(adapter_file)
    with safe_open(str(adapter_file), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        keys = list(handle.keys()) if is_lycoris(metadata) else []
        tensors = {key: handle.get_tensor(key) for key in keys}
    if not tensors:
        pipeline.load_lora_weights(
            str(adapter_file.parent), weight_name=adapter_file.name, adapter_name=adapter_name
        )
        return
    configs: dict[str, dict] = {}
    for key, value in json.loads(metadata["lora_adapter_metadata"]).items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        prefix = f"{component}."
        state_dict = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        model = getattr(pipeline, component)
        try:
            model.add_adapter(get_peft_config(config), adapter_name=adapter_name)
            result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
        except (ValueError, RuntimeError) as error:  # no such module / a shape that does not fit
            raise ModelError(
                f"the adapter {adapter_file} does not fit the base model's {component}: {error}",
                hint="load it on the base model it was trained on",
            ) from error
        if result.unexpected_keys:
            raise ModelError(
                f"the adapter {adapter_file} adapts {result.unexpected_keys[0]}, which the base lacks",
                hint="load it on the base model it was trained on",
            )


# Keys of adapter kinds a LoRA run cannot continue: LyCORIS' LoKr/LoHa factors, DoRA's magnitudes
# (kohya's `dora_scale`, which diffusers' reader drops with a warning, and PEFT's `lora_magnitude_vector`).
_NOT_LORA_KEYS = ("lokr_", "hada_", "dora_scale", "lora_magnitude_vector")
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def load_init_adapter(
    adapter_file: Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    text_encoder_2: torch.nn.Module | None,
    *,
    train_text_encoders: bool,
) -> dict[str, LoraConfig]:
    """Inject the LoRA of `adapter_file` (tuner's, diffusers', PEFT-in-diffusers or kohya's layout) as the
    trainable "default" adapter, its weights as the starting point; returns the config per component.

    diffusers reads and converts the file (`lora_state_dict`, its kohya converter) and injects it
    (`load_lora_into_unet` / `load_lora_into_text_encoder`), so rank, alpha (kohya's `.alpha`, the
    header's config) and per-module ranks (`rank_pattern`) are exactly what `load_lora_weights` builds.
    """
    adapter_file = Path(adapter_file)
    if not adapter_file.is_file():
        raise ConfigError(
            f"lora.init_adapter {adapter_file} is not a file",
            hint="pass a LoRA .safetensors file (tuner's, diffusers', PEFT's or kohya's)",
        )
    with safe_open(str(adapter_file), framework="pt") as handle:
        raw_keys = list(handle.keys())
    other = next((key for key in raw_keys if any(part in key for part in _NOT_LORA_KEYS)), None)
    if other is not None:
        raise ConfigError(
            f"lora.init_adapter {adapter_file} is not a plain LoRA (key {other}: LoKr, LoHa or DoRA)",
            hint="start from a LoRA file, or train this adapter kind from scratch",
        )
    state_dict, network_alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
        str(adapter_file.parent),
        weight_name=adapter_file.name,
        unet_config=unet.config,
        return_lora_metadata=True,
    )
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    by_component: dict[str, list[str]] = {}
    for key in state_dict:
        component, _, rest = key.partition(".")
        if component not in models:
            raise ModelError(
                f"lora.init_adapter {adapter_file}: key {key} belongs to no SDXL component",
                hint="start from a LoRA trained for SDXL (unet, text_encoder, text_encoder_2 keys)",
            )
        by_component.setdefault(component, []).append(rest)
    text_keys = [key for key in state_dict if not key.startswith("unet.")]
    if text_keys and not train_text_encoders:
        raise ConfigError(
            f"lora.init_adapter {adapter_file} adapts the text encoders ({text_keys[0]}), but "
            "lora.text_encoder is off",
            hint="add --set lora.text_encoder=true to train them too",
        )
    if train_text_encoders and not text_keys:
        raise ConfigError(
            f"lora.text_encoder is on, but lora.init_adapter {adapter_file} holds no text-encoder LoRA",
            hint="remove lora.text_encoder, or start from a file that adapts the text encoders",
        )
    if "unet" not in by_component:
        raise ConfigError(
            f"lora.init_adapter {adapter_file} holds no UNet LoRA",
            hint="start from a file that adapts the UNet",
        )
    # Named before injection, as PEFT would otherwise refuse a whole target list at once. The text
    # encoders' keys are left to transformers, which maps their `text_model.` level itself.
    names = dict(unet.named_modules())
    unet_keys = {key: key for key in by_component["unet"]}
    if not any("lora_A" in key for key in unet_keys):  # diffusers' older names, kohya's after conversion
        unet_keys = dict(zip(convert_unet_state_dict_to_peft(unet_keys), unet_keys, strict=True))
    for key, original in unet_keys.items():
        if key.split(".lora_")[0] not in names:
            raise ModelError(
                f"lora.init_adapter {adapter_file}: key unet.{original} matches no module of the base "
                "model's UNet",
                hint="start from a LoRA trained for this base model (SDXL layout)",
            )
    try:
        StableDiffusionXLPipeline.load_lora_into_unet(
            state_dict, network_alphas, unet, adapter_name="default", metadata=metadata
        )
        for component in ("text_encoder", "text_encoder_2"):
            if component in by_component:
                StableDiffusionXLPipeline.load_lora_into_text_encoder(
                    state_dict,
                    network_alphas,
                    models[component],
                    prefix=component,
                    adapter_name="default",
                    metadata=metadata,
                )
    except (ValueError, RuntimeError) as error:  # a shape that does not fit (SD1.5's widths)
        first = str(error).strip().splitlines()[-1]
        raise ModelError(
            f"lora.init_adapter {adapter_file} does not fit the base model: {first}",
            hint="start from a LoRA trained for this base model (SDXL layout)",
        ) from error
    return {component: models[component].peft_config["default"] for component in by_component}


def train_loaded_adapter(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Make a loaded "default" adapter trainable in fp32 (as `add_lora` leaves a fresh one)."""
    parameters = [parameter for name, parameter in model.named_parameters() if "lora_" in name]
    for parameter in parameters:
        parameter.requires_grad_(True)
        parameter.data = parameter.data.float()
    return parameters


def target_groups(target_modules: list[str] | set[str] | str) -> list[str]:
    """tuner's UNet target groups (`attention`, `ffn`, `conv`) a loaded adapter's modules belong to;
    a module outside them (kohya's `proj_in`, say) is named as it is."""
    modules = [target_modules] if isinstance(target_modules, str) else sorted(target_modules)
    groups: list[str] = []
    for module in modules:
        # A full path (`...ff.net.2`) or a shorter suffix: diffusers' config for a kohya file targets
        # `net.2` and `proj` (PEFT matches them as suffixes, here only the feed-forward layers').
        dotted = "." + module
        group = next(
            (
                name
                for name, suffixes in UNET_TARGET_GROUPS.items()
                if any(
                    dotted.endswith("." + suffix) or ("." + suffix).endswith(dotted) for suffix in suffixes
                )
            ),
            module.split(".")[-1],
        )
        if group not in groups:
            groups.append(group)
    order = list(UNET_TARGET_GROUPS)
    return sorted(groups, key=lambda group: (order.index(group) if group in order else len(order), group))
