"""Qwen-VL models: which family a checkpoint is, loading it, where LoRA goes, saving and loading adapters.

Module layout in transformers 5.23 (the same for every family below):

* language model: `model.language_model.layers.N.self_attn.{q,k,v,o}_proj` and
  `model.language_model.layers.N.mlp.{gate,up,down}_proj` (Qwen3-VL-MoE: attention only, plus the dense
  MLP of any `mlp_only_layers`);
* Qwen3-VL-MoE experts and router: each sparse layer's `mlp.experts` holds every expert's weights as two
  fused 3-D parameters, `gate_up_proj` (experts, 2 x moe_intermediate, hidden) and `down_proj` (experts,
  hidden, moe_intermediate), and `mlp.gate` (the router) a 2-D `weight` (experts, hidden). None of them is
  an `nn.Linear`, so the `experts` and `router` groups adapt *parameters* (PEFT's `target_parameters`,
  one LoRA per expert), never modules. The router stays frozen unless `router` is asked for: a LoRA on
  it changes which experts each token goes to;
* vision tower: `model.visual.blocks.N.attn.{qkv,proj}` and the block MLP, whose names differ per
  family (Qwen2-VL `fc1/fc2`, Qwen2.5-VL `gate_proj/up_proj/down_proj`, Qwen3-VL `linear_fc1/linear_fc2`);
* merger (vision -> text projection): `model.visual.merger.*`, and on Qwen3-VL also the DeepStack
  mergers `model.visual.deepstack_merger_list.N.*`.

Targets are matched on full module names anchored at these roots, never on bare suffixes: in Qwen2.5-VL
the vision MLP is also called `gate_proj/up_proj/down_proj`, so a suffix list would silently adapt the
vision tower when only the language model was asked for. The Conv3d patch embedding is never adapted.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
)

from tuner.atomic import give_default_modes
from tuner.config.schema import LORA_INIT_WEIGHTS
from tuner.errors import ConfigError, ModelError

# peft 0.21 reads transformers 5.23's deprecated `is_gradient_checkpointing` whenever it wraps or loads an
# adapter; the FutureWarning is about their code, not the user's, so it does not belong in tuner's output.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

SUPPORTED_MODEL_TYPES: dict[str, type[PreTrainedModel]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
}

LORA_TARGET_GROUPS = ("llm", "vision", "merger", "experts", "router")
# Groups that adapt parameters rather than modules (PEFT `target_parameters`), per family that has them.
_PARAMETER_GROUPS = ("experts", "router")
_MOE_LAYER = r"model\.language_model\.layers\.\d+\.mlp"
# group -> (the module holding the parameters, the parameter names), as regular expressions.
_TARGET_PARAMETER_PATTERNS: dict[str, dict[str, tuple[str, str]]] = {
    "qwen3_vl_moe": {
        "experts": (rf"{_MOE_LAYER}\.experts", "gate_up_proj|down_proj"),
        "router": (rf"{_MOE_LAYER}\.gate", "weight"),
    },
}
# What an adapter folder holds besides PEFT's own files: who made it, from which base model.
ADAPTER_METADATA_FILE = "tuner_adapter.json"
# With train.ema_decay: the EMA weights as a second, complete adapter folder inside the output folder.
EMA_ADAPTER_DIR = "ema"

_LANGUAGE_MODEL = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
_VISION_ATTENTION = r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)"
_QWEN3_MERGERS = r"model\.visual\.(merger|deepstack_merger_list\.\d+)\.linear_fc[12]"
_TARGET_PATTERNS: dict[str, dict[str, str]] = {
    "qwen2_vl": {
        "llm": _LANGUAGE_MODEL,
        "vision": rf"{_VISION_ATTENTION}|model\.visual\.blocks\.\d+\.mlp\.fc[12]",
        "merger": r"model\.visual\.merger\.mlp\.\d+",
    },
    "qwen2_5_vl": {
        "llm": _LANGUAGE_MODEL,
        "vision": rf"{_VISION_ATTENTION}|model\.visual\.blocks\.\d+\.mlp\.(gate|up|down)_proj",
        "merger": r"model\.visual\.merger\.mlp\.\d+",
    },
    "qwen3_vl": {
        "llm": _LANGUAGE_MODEL,
        "vision": rf"{_VISION_ATTENTION}|model\.visual\.blocks\.\d+\.mlp\.linear_fc[12]",
        "merger": _QWEN3_MERGERS,
    },
}
_TARGET_PATTERNS["qwen3_vl_moe"] = _TARGET_PATTERNS["qwen3_vl"]



def detect_family(config_or_path: PretrainedConfig | Mapping[str, Any] | str | Path) -> str:
    """The model type (`qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, `qwen3_vl_moe`) of a config, dict or folder."""
    if isinstance(config_or_path, PretrainedConfig):
        model_type, origin = config_or_path.model_type, "the model config"
    elif isinstance(config_or_path, Mapping):
        model_type, origin = config_or_path.get("model_type"), "the model config"
    else:
        model_type, origin = read_config_dict(str(config_or_path)).get("model_type"), str(config_or_path)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"unsupported model type {model_type!r} in {origin}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
            hint="pass a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint (its config.json names the model_type)",
        )
    return model_type


def read_config_dict(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """config.json of a folder or hub ID, read as data: nothing is instantiated and no custom code runs."""
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name_or_path, revision=revision)
    except OSError as error:
        raise ModelError(
            f"cannot read the model config of {name_or_path}: {error}",
            hint="check the path or hub ID (offline runs need the model in the local cache)",
        ) from error
    return config_dict


def load_qwenvl(
    name_or_path: str,
    *,
    dtype: torch.dtype,
    attention: str = "sdpa",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin, str]:
    """Load a Qwen-VL model and its processor; returns (model, processor, family)."""
    config_dict = read_config_dict(name_or_path, revision)
    if "auto_map" in config_dict and not trust_remote_code:
        raise ModelError(
            f"model {name_or_path} ships its own Python code (auto_map in config.json)",
            hint="pass --trust-remote-code if you trust its source, or use a transformers-native checkpoint",
        )
    family = detect_family(config_dict)
    # With trust_remote_code the checkpoint's own class (auto_map) wins over transformers' one.
    model_class = AutoModelForImageTextToText if trust_remote_code else SUPPORTED_MODEL_TYPES[family]
    try:
        model = model_class.from_pretrained(
            name_or_path,
            dtype=dtype,
            attn_implementation=attention,
            # None lets transformers fall back to pickle (.bin) weights when no safetensors exist.
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            revision=revision,
        )
    except OSError as error:
        if not allow_pickle and "safetensors" in str(error):
            raise ModelError(
                f"model {name_or_path} has no safetensors weights (pickle .bin files can run code on load)",
                hint="convert the weights to safetensors, or pass --allow-pickle if you trust the source",
            ) from error
        raise ModelError(
            f"cannot load model {name_or_path}: {error}", hint="check the path or hub ID"
        ) from error
    except (ImportError, ValueError) as error:
        raise ModelError(
            f"cannot load model {name_or_path} with attention {attention!r}: {error}",
            hint="use --attention sdpa (flash_attention_2 needs flash-attn on CUDA, or torch_npu on Ascend)",
        ) from error
    try:
        processor = AutoProcessor.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision
        )
    except OSError as error:
        raise ModelError(
            f"cannot load the processor of {name_or_path}: {error}",
            hint="the folder needs the tokenizer, preprocessor and chat template files saved with the model",
        ) from error
    return model, processor, family


def lora_target_modules(model: torch.nn.Module, family: str, targets: Sequence[str]) -> list[str]:
    """Full names of the `nn.Linear` modules that LoRA adapts for `targets` (any of llm, vision, merger;
    `experts` and `router` adapt parameters: see `lora_target_parameters`)."""
    check_lora_targets(family, targets)
    names: list[str] = []
    for target in targets:
        if target in _PARAMETER_GROUPS:
            continue
        pattern = re.compile(_TARGET_PATTERNS[family][target])
        matched = [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)
        ]
        if not matched:
            raise ModelError(
                f"LoRA target {target!r} matched no layer of this {family} model",
                hint="the checkpoint's module layout differs from transformers' own (remote code?)",
            )
        names.extend(name for name in matched if name not in names)
    return names


def lora_target_parameters(model: torch.nn.Module, family: str, targets: Sequence[str]) -> list[str]:
    """Full names of the parameters LoRA adapts for the `experts` and `router` groups in `targets`
    (Qwen3-VL-MoE's fused expert weights and router weights); empty when neither is asked for."""
    check_lora_targets(family, targets)
    names: list[str] = []
    for target in targets:
        if target not in _PARAMETER_GROUPS:
            continue
        module, parameters = _TARGET_PARAMETER_PATTERNS[family][target]
        pattern = re.compile(rf"{module}\.({parameters})")
        matched = [name for name, _ in model.named_parameters() if pattern.fullmatch(name)]
        if not matched:
            raise ModelError(
                f"LoRA target {target!r} matched no parameter of this {family} model",
                hint="the checkpoint's module layout differs from transformers' own (remote code?)",
            )
        names.extend(name for name in matched if name not in names)
    return names


def check_lora_targets(family: str, targets: Sequence[str]) -> None:
    """Refuse unknown target groups, and `experts`/`router` on a model without experts."""
    unknown = [target for target in targets if target not in LORA_TARGET_GROUPS]
    if unknown or not targets:
        raise ConfigError(
            f"unknown Qwen-VL LoRA target {unknown[0]!r} in lora.targets"
            if unknown
            else "lora.targets is empty",
            hint=f"use any of: {', '.join(LORA_TARGET_GROUPS)}",
        )
    if family not in _TARGET_PATTERNS:
        raise ModelError(f"no LoRA targets known for model type {family!r}")
    moe_only = [t for t in targets if t in _PARAMETER_GROUPS and family not in _TARGET_PARAMETER_PATTERNS]
    if moe_only:
        raise ConfigError(
            f"lora.targets: {moe_only[0]!r} needs a mixture-of-experts model (Qwen3-VL-MoE); "
            f"this is a {family} model",
            hint=f"remove {moe_only[0]} from --targets / lora.targets (dense models: llm, vision, merger)",
        )


def add_lora(
    model: PreTrainedModel,
    target_modules: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    init: str = "default",
    use_rslora: bool = False,
    target_parameters: Sequence[str] = (),
    variant: str = "lora",
) -> PeftModel:
    """Wrap `model` with LoRA on exactly `target_modules` and `target_parameters` (fused expert and
    router weights, see `lora_target_parameters`); every other parameter is frozen. `variant="dora"`
    is PEFT's DoRA (`use_dora`)."""
    if init not in LORA_INIT_WEIGHTS:
        raise ConfigError(
            f"lora.init {init!r} is not available for Qwen-VL",
            hint="use default or gaussian (PiSSA/OLoRA/LoftQ rewrite the base weights)",
        )
    if target_parameters and dropout:
        # peft 0.21's ParamWrapper adds the LoRA to the weight, so there is no input to drop out; it
        # refuses any lora_dropout in the config, which is shared by every adapted layer.
        raise ConfigError(
            f"lora.dropout={dropout} does not work with LoRA on the experts or the router",
            hint="set lora.dropout 0, or remove experts/router from --targets",
        )
    if variant not in ("lora", "dora"):
        raise ConfigError(
            f"lora.variant {variant!r} is not available for Qwen-VL",
            hint="use lora or dora (LoKr and LoHa are SDXL's)",
        )
    if target_parameters and variant == "dora":
        # peft 0.21's ParamWrapper refuses use_dora.
        raise ConfigError(
            "lora.variant=dora does not work with LoRA on the experts or the router",
            hint="set lora.variant lora, or remove experts/router from --targets",
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights=LORA_INIT_WEIGHTS[init],
        # Exact names: PEFT matches a list entry against the whole module name (or a `.`-suffix of it).
        target_modules=list(target_modules),
        target_parameters=list(target_parameters) or None,
        use_rslora=use_rslora,
        use_dora=variant == "dora",
    )
    return get_peft_model(model, config)


def lora_parameter_groups(
    model: torch.nn.Module,
    family: str,
    lr: float,
    lr_vision: float | None = None,
    lr_merger: float | None = None,
) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: `llm` at `lr`, `vision` and `merger` LoRA weights at
    `lr_vision` / `lr_merger` when set (`lora.lr_vision`, `lora.lr_merger`), else at `lr`; Qwen3-VL-MoE's
    `experts` and `router` LoRA weights form groups of their own at `lr`, so their sizes are printed.

    A weight's group is that of the module it adapts (the patterns of lora_target_modules); each
    group carries its `name`. A rate set for a group that has no trainable weights is refused: it would
    act on nothing.
    """
    patterns = {group: re.compile(_TARGET_PATTERNS[family][group]) for group in ("vision", "merger")}
    # A parameter LoRA lives on the module that holds the parameter; a second parameter of the same
    # module nests its wrapper, so the inner LoRA's module name gains `.base_layer`.
    for group, (holder, _) in _TARGET_PARAMETER_PATTERNS.get(family, {}).items():
        patterns[group] = re.compile(rf"{holder}(\.base_layer)*")
    grouped: dict[str, list[torch.nn.Parameter]] = {
        "llm": [],
        "experts": [],
        "router": [],
        "vision": [],
        "merger": [],
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # PEFT names a LoRA weight `base_model.model.<module>.lora_A.<adapter>.weight`.
        module = name.removeprefix("base_model.model.").partition(".lora_")[0]
        group = next((g for g, pattern in patterns.items() if pattern.fullmatch(module)), "llm")
        grouped[group].append(param)
    rates = {"llm": lr, "experts": lr, "router": lr, "vision": lr_vision or lr, "merger": lr_merger or lr}
    for group, key, rate in (
        ("vision", "lora.lr_vision", lr_vision),
        ("merger", "lora.lr_merger", lr_merger),
    ):
        if rate is not None and not grouped[group]:
            raise ConfigError(
                f"{key}={rate} is set, but no {group} weights are trained",
                hint=f"add {group} to lora.targets, or remove {key}",
            )
    return [
        {"params": params, "lr": rates[group], "name": group} for group, params in grouped.items() if params
    ]


def describe_parameter_groups(groups: Sequence[Mapping[str, Any]]) -> str:
    """`trainable parameters: llm 12,288 (lr 0.0001), ...`: the line a run prints before training."""
    return "trainable parameters: " + ", ".join(
        f"{group['name']} {sum(p.numel() for p in group['params']):,} (lr {group['lr']:g})"
        for group in groups
    )


def enable_gradient_checkpointing(model: PreTrainedModel | PeftModel) -> None:
    """Recompute the language and vision blocks in backward instead of keeping their activations.

    Non-reentrant checkpointing: the reentrant variant only back-propagates into a block whose *inputs*
    require grad, and with a frozen base model nothing does: the vision blocks' input comes from the
    frozen Conv3d patch embedding, so LoRA on the vision tower would silently get no gradient
    (`enable_input_require_grads` only hooks the text embedding and does not cover it).
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def rope_index_of(model: torch.nn.Module):
    """The model's own M-RoPE position function: `get_rope_index` of the inner Qwen-VL model.

    Wrappers (PEFT, DDP) are looked through; the function reads only the config, so it serves
    whatever wraps the model later.
    """
    for module in model.modules():
        if hasattr(type(module), "get_rope_index"):
            return module.get_rope_index
    raise ModelError(
        f"{type(model).__name__} has no get_rope_index, so packed samples cannot get their positions",
        hint="set data.packing: false",
    )


def save_adapter(
    peft_model: PeftModel,
    output_dir: str | Path,
    processor: ProcessorMixin,
    metadata: Mapping[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a standard PEFT adapter, the processor (chat template included) and `tuner_adapter.json`.

    `state_dict`: the model's full weights gathered from ZeRO-3/FSDP shards (see
    `tuner.distributed.gathered_state_dict`); None saves `peft_model`'s own weights.

    `metadata` should name `base_model` (recorded as the adapter's `base_model_name_or_path` too) and
    `family`; tuner, transformers and peft versions are added here.
    """
    import peft
    import transformers

    import tuner

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if "base_model" in metadata:
        # PEFT records model.name_or_path, which for a hub model is a local cache folder.
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = str(metadata["base_model"])
    # Embeddings are never adapted or resized here; "auto" would ask the hub whether the vocabulary changed.
    peft_model.save_pretrained(str(output_dir), save_embedding_layers=False, state_dict=state_dict)
    give_default_modes(output_dir / SAFETENSORS_WEIGHTS_NAME)  # safetensors 0.8 writes it private (0600)
    processor.save_pretrained(str(output_dir))
    record = {
        **metadata,
        "tuner_version": tuner.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
    }
    (output_dir / ADAPTER_METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return output_dir


def load_adapter_checked(base_model: PreTrainedModel, adapter_dir: str | Path) -> PeftModel:
    """Load a PEFT adapter onto `base_model`, refusing one whose weights do not all land on a LoRA layer.

    `PeftModel.from_pretrained` (peft 0.21) only warns about missing keys and drops unexpected ones, so an
    adapter for another model would load as a partly or wholly untrained one.
    """
    adapter_dir = str(adapter_dir)
    try:
        config = PeftConfig.from_pretrained(adapter_dir)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"{adapter_dir} is not a PEFT adapter folder: {error}",
            hint="pass the folder that holds adapter_config.json and adapter_model.safetensors",
        ) from error
    try:
        peft_model = PeftModel(base_model, config)
    except ValueError as error:
        raise ModelError(
            f"adapter {adapter_dir} does not fit this model: {error}",
            hint="load it onto the base model it was trained on (see base_model in tuner_adapter.json)",
        ) from error
    # Loading into the adapter that already exists returns the load result from_pretrained discards.
    result = peft_model.load_adapter(adapter_dir, adapter_name="default")
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"adapter {adapter_dir} does not match this model: "
            f"{len(result.missing_keys)} LoRA weights missing from the file "
            f"(e.g. {', '.join(result.missing_keys[:3]) or '-'}), "
            f"{len(result.unexpected_keys)} weights in the file fit no layer "
            f"(e.g. {', '.join(result.unexpected_keys[:3]) or '-'})",
            hint="load it onto the base model it was trained on (see base_model in tuner_adapter.json)",
        )
    return peft_model
