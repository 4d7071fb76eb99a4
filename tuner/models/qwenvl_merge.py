"""Merge a Qwen-VL LoRA adapter into its base model: one plain transformers folder, no PEFT needed to load it.

The merge streams: the base's safetensors shards are read tensor by tensor (safetensors' lazy
`safe_open`), each adapted weight gets PEFT's LoRA delta `scale * alpha/r * B @ A` in fp32 (rank and
alpha per module from the adapter's rank_pattern/alpha_pattern, rsLoRA's alpha/sqrt(r)), is cast to the
output dtype and appended to the output shard of the same name. The output keeps the base's key names,
shard files and index, so peak memory is the adapter plus one tensor, not the model (a 7B model in fp32
is 30 GB).

Beside the weights the merged folder holds what a serving stack reads: config.json (its dtype updated),
generation_config.json, the tokenizer files, the chat template and the processor. The processor comes
from the adapter folder when tuner saved one there (the one the adapter was trained with), else from the
base model.

Qwen3-VL-MoE expert and router LoRA (PEFT `target_parameters`) merges the same way, one expert at a
time; real checkpoints store the fused expert weights transposed (experts, in, out), as transformers'
conversion mapping says, and the delta is added in the stored layout.

Safety: an adapter recorded for another model family, whose LoRA modules are not in the base or do not
fit its shapes, or that is not LoRA or DoRA (modules_to_save, other PEFT types), is refused before anything
is written; a DoRA weight is PEFT's merge, `m / ||W + delta|| * (W + delta)` per output row;
the merge is written to a temporary folder beside `output` and moved into place in one `os.replace`, so
a failed or interrupted merge leaves no output folder.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tuner.atomic import write_folder_atomically
from tuner.errors import ConfigError, ModelError
from tuner.formats.safetensors_stream import SafetensorsStreamWriter
from tuner.models.qwenvl import SUPPORTED_MODEL_TYPES, detect_family, read_config_dict
from tuner.models.qwenvl_infer import (
    ADAPTER_WEIGHTS_FILE,
    check_adapter_family,
    load_processor_of,
    read_adapter_record,
    resolve_qwenvl_model,
)

# What a merged folder records about how it was made (not an adapter file: nothing reads it to load).
MERGE_RECORD_FILE = "tuner_merge.json"
MERGED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files of a model folder that are weights (rewritten or left behind), not configuration to copy.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_SKIPPED_FILES = {SAFETENSORS_INDEX, "pytorch_model.bin.index.json"}
# From a hub ID only what a merged folder needs: never pickle weights, never model code.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


@dataclass(frozen=True)
class LoraDelta:
    """One adapted weight's LoRA: `down` (A, r x in), `up` (B, out x r) and PEFT's `scaling`.

    On a fused expert stack (`experts` > 1, PEFT's ParamWrapper) A is (experts * r) x in and B
    out x (r * experts): one rank-r pair per expert; `stored_transposed` when the checkpoint keeps the
    stack as (experts, in, out) while the model uses (experts, out, in).
    """

    down: torch.Tensor
    up: torch.Tensor
    scaling: float
    fan_in_fan_out: bool
    experts: int = 1
    stored_transposed: bool = False
    # DoRA's magnitude per output row (PEFT's lora_magnitude_vector); None for plain LoRA.
    magnitude: torch.Tensor | None = None

    def fused(self, weight: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """`weight + scale * scaling * B @ A` in fp32, then cast (what PEFT's merge computes); with DoRA
        each output row is then rescaled to its magnitude (peft 0.21 `lora.Linear.merge`)."""
        if self.experts == 1:
            delta = self.up.float() @ self.down.float()
            if self.fan_in_fan_out:  # Conv1D-style weights are stored (in, out)
                delta = delta.T
            merged = weight.float() + scale * self.scaling * delta
            if self.magnitude is not None:
                rows = merged.T if self.fan_in_fan_out else merged
                rows = rows * (self.magnitude.float() / rows.norm(p=2, dim=1)).unsqueeze(1)
                merged = rows.T if self.fan_in_fan_out else rows
            return merged.to(dtype)
        # peft 0.21 ParamWrapper.get_delta_weight: A's rows are expert-major, B's columns rank-major.
        # One expert at a time, so a delta the size of the whole stack is never held.
        down = self.down.float().reshape(self.experts, -1, self.down.shape[-1])
        up = self.up.float().reshape(self.up.shape[0], -1, self.experts)
        merged = weight.to(torch.float32, copy=True)
        for expert in range(self.experts):
            delta = up[:, :, expert] @ down[expert]
            merged[expert] += scale * self.scaling * (delta.T if self.stored_transposed else delta)
        return merged.to(dtype)


def merge_qwenvl_adapter(
    base: str,
    adapter_dir: Path,
    output: Path,
    scale: float = 1.0,
    dtype: str | None = None,
    *,
    overwrite: bool = False,
    hub_source: str = "huggingface",
    offline: bool = False,
    revision: str | None = None,
) -> Path:
    """Merge `adapter_dir` into `base` with the adapter scaled by `scale`; returns the output folder.

    Each delta is added in fp32; the merged weights are cast to `dtype` (float32, bfloat16, float16;
    default: the dtype in the base model's config.json).
    """
    adapter_dir, output = Path(adapter_dir), Path(output)
    if not math.isfinite(scale):
        raise ConfigError(f"merge scale {scale} is not a finite number", hint="use e.g. --scale 1.0")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(
            f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)",
            hint="pass the training output folder (it holds adapter_config.json and the adapter weights)",
        )
    _refuse_existing_output(output, overwrite)

    base_folder = _local_folder(base, hub_source, offline, revision)
    config_dict = read_config_dict(str(base_folder))
    family = detect_family(config_dict)
    check_adapter_family(adapter_dir, family, base)
    merged_dtype = _merged_dtype(dtype, config_dict, base)
    write = _merge_streaming(base_folder, config_dict, adapter_dir, base, scale, merged_dtype)

    record = {
        "base_model": base,
        "adapter": str(adapter_dir.resolve()),
        "adapter_base_model": read_adapter_record(adapter_dir).get("base_model"),
        "family": family,
        "scale": scale,
        "dtype": str(merged_dtype).removeprefix("torch."),
    }
    write_folder_atomically(output, _with_record(write, record), replace=overwrite)
    return output


def _merge_streaming(
    base_folder: Path,
    config_dict: dict[str, Any],
    adapter_dir: Path,
    base: str,
    scale: float,
    dtype: torch.dtype,
) -> Callable[[Path], None]:
    """Check the adapter against the base's stored weights now; the returned function writes the merge."""
    shards = _weight_shards(base_folder, base)
    plan = _merge_plan(base_folder, config_dict, shards, read_lora_deltas(adapter_dir), adapter_dir, base)
    processor = load_processor_of(adapter_dir)

    def write(staging: Path) -> None:
        _copy_configuration(base_folder, staging, dtype)
        _write_shards(base_folder, adapter_dir, staging, shards, plan, scale, dtype)
        if processor is not None:
            processor.save_pretrained(str(staging))

    return write


def _invalid_weights(adapter_dir: Path, detail: str) -> ModelError:
    return ModelError(
        f"merging adapter {adapter_dir} produced invalid weights: {detail}",
        hint="the adapter holds NaN/inf values; merge an earlier checkpoint of the run",
    )


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    config_file = adapter_dir / "adapter_config.json"
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(
            f"cannot read {config_file}: {error}", hint="restore it from the training output"
        ) from error


def read_lora_deltas(adapter_dir: Path) -> dict[str, LoraDelta]:
    """The adapter's LoRA per adapted module (the module's name as PEFT saved it), refusing what a plain
    LoRA merge cannot express."""
    config = _read_adapter_config(adapter_dir)
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(
            f"adapter {adapter_dir} is a {config.get('peft_type')} adapter; tuner merges LoRA and DoRA only",
            hint="merge it with PEFT: PeftModel.from_pretrained(base, adapter).merge_and_unload()",
        )
    weights_file = adapter_dir / ADAPTER_WEIGHTS_FILE
    if not weights_file.is_file():
        raise ModelError(
            f"adapter {adapter_dir} has no {ADAPTER_WEIGHTS_FILE}",
            hint="pass the training output folder; pickle adapters (adapter_model.bin) are not merged",
        )
    matrices: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_file), framework="pt") as weights:
        for key in weights.keys():  # noqa: SIM118 - safe_open is not a dict
            # PEFT saves `base_model.model.<module>.lora_A.weight` (the adapter name removed).
            module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            if kind == "magnitude_vector":
                matrices.setdefault(module, {})["magnitude"] = weights.get_tensor(key)
                continue
            if kind not in ("A.weight", "B.weight"):
                raise ModelError(
                    f"adapter weight {key} in {weights_file} is not a LoRA A/B matrix",
                    hint="tuner merges plain LoRA only (no modules_to_save, bias or embedding LoRA); "
                    "merge it with PEFT's merge_and_unload",
                )
            matrices.setdefault(module, {})[kind[0]] = weights.get_tensor(key)
    deltas = {}
    for module, pair in matrices.items():
        missing = sorted({"A", "B"} - set(pair))
        if missing:
            raise ModelError(
                f"adapter {weights_file} has no lora_{missing[0]} for {module}",
                hint="the adapter file is incomplete: save it again from the training output",
            )
        # rank_pattern is already in the shapes (an expert stack's rank is fixed in _merge_plan).
        scaling = _lora_scaling(config, module, pair["A"].shape[0])
        deltas[module] = LoraDelta(
            pair["A"], pair["B"], scaling, bool(config.get("fan_in_fan_out")), magnitude=pair.get("magnitude")
        )
    if not deltas:
        raise ModelError(
            f"adapter {weights_file} holds no LoRA weights", hint="pass a trained adapter folder"
        )
    return deltas


def _lora_scaling(config: Mapping[str, Any], name: str, rank: int) -> float:
    """PEFT's scaling of one LoRA: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = float(
        config.get("alpha_pattern", {}).get(_pattern_key(config, name), config.get("lora_alpha", rank))
    )
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pattern_key(config: Mapping[str, Any], module: str) -> str:
    from peft.utils.other import get_pattern_key

    # PEFT's own rule for which alpha_pattern entry a module name takes.
    return get_pattern_key(list(config.get("alpha_pattern") or {}), module)


def _merge_plan(
    base_folder: Path,
    config_dict: dict[str, Any],
    shards: dict[str, list[str]],
    deltas: dict[str, LoraDelta],
    adapter_dir: Path,
    base: str,
) -> dict[str, LoraDelta]:
    """Which stored weight (checkpoint key) takes which LoRA, after checking every LoRA has a weight it fits.

    Checkpoints store Qwen-VL weights under their original names (`model.layers.N`, `visual.blocks.N`)
    while transformers 5 and so PEFT name modules `model.language_model.layers.N`, `model.visual...`;
    transformers' own conversion mapping for the model class translates one into the other.
    """
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    # A model on the meta device: its parameter names and the conversion mapping, no memory.
    with torch.device("meta"):
        model = SUPPORTED_MODEL_TYPES[detect_family(config_dict)](
            AutoConfig.from_pretrained(str(base_folder))
        )
    transforms = get_model_conversion_mapping(model)
    renamings = [item for item in transforms if isinstance(item, WeightRenaming)]
    converters = [item for item in transforms if isinstance(item, WeightConverter)]
    parameters = dict(model.state_dict())

    def model_name(key: str) -> tuple[str, bool]:
        name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, parameters)
        return name, converter is not None

    stored: dict[str, tuple[str, bool]] = {}  # model parameter name -> (checkpoint key, converted)
    for keys in shards.values():
        for key in keys:
            name, converted = model_name(key)
            stored[name] = (key, converted)
    shapes: dict[str, tuple[int, ...]] = {}
    for file, keys in shards.items():
        with safe_open(str(base_folder / file), framework="pt") as handle:
            shapes |= {key: tuple(handle.get_slice(key).get_shape()) for key in keys}

    adapted_parameters = _parameter_lora_targets(model, adapter_dir)
    plan = {}
    for module, delta in deltas.items():
        if module in adapted_parameters:
            key, fitted = _fit_parameter_lora(
                adapted_parameters[module], delta, parameters, stored, shapes, adapter_dir
            )
            if fitted is None:
                found = "no such weight" if key is None else f"stored weight {key} {shapes[key]}"
                raise ModelError(
                    f"adapter {adapter_dir} does not fit {base} at {adapted_parameters[module]}: LoRA "
                    f"{tuple(delta.down.shape)} x {tuple(delta.up.shape)} vs {found}",
                    hint="merge it into the base model it was trained on (tuner_adapter.json names it)",
                )
            plan[key] = fitted
            continue
        # Adapters saved with transformers 4 name modules as checkpoints do; the same mapping fits both.
        key, converted = stored.get(model_name(f"{module}.weight")[0], (None, False))
        out_features, in_features = delta.up.shape[0], delta.down.shape[1]
        expected = (in_features, out_features) if delta.fan_in_fan_out else (out_features, in_features)
        shape = shapes.get(key) if key is not None else None
        if key is None or converted or shape != expected:
            found = "no such weight" if key is None else f"stored weight {key} {shape}"
            raise ModelError(
                f"adapter {adapter_dir} does not fit {base} at {module}: LoRA "
                f"{tuple(delta.down.shape)} x {tuple(delta.up.shape)} vs {found}",
                hint="merge it into the base model it was trained on (see base_model in tuner_adapter.json)",
            )
        plan[key] = delta
    return plan


def _parameter_lora_targets(model: torch.nn.Module, adapter_dir: Path) -> dict[str, str]:
    """PEFT's saved name of each parameter LoRA (`...mlp.experts.base_layer`) -> the parameter it adapts.

    A LoRA on a parameter (`target_parameters`: fused expert weights, a router) is saved under the name of
    the wrapper around the module that holds it, nested once more for each further parameter of that
    module, so the name alone does not say which parameter it adapts: PEFT's own injection into `model`
    (on the meta device, no memory) does.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import ParamWrapper

    config = LoraConfig.from_pretrained(str(adapter_dir))
    if not config.target_parameters:
        return {}
    try:
        inject_adapter_in_model(config, model, low_cpu_mem_usage=True)
    except ValueError as error:
        raise ModelError(
            f"adapter {adapter_dir} does not fit this model: {error}",
            hint="merge it into the base model it was trained on (see base_model in tuner_adapter.json)",
        ) from error
    return {
        name: f"{name.replace('.base_layer', '')}.{module.parameter_name}"
        for name, module in model.named_modules()
        if isinstance(module, ParamWrapper)
    }


def _fit_parameter_lora(
    parameter: str,
    delta: LoraDelta,
    parameters: Mapping[str, torch.Tensor],
    stored: Mapping[str, tuple[str, bool]],
    shapes: Mapping[str, tuple[int, ...]],
    adapter_dir: Path,
) -> tuple[str | None, LoraDelta | None]:
    """(checkpoint key, the LoRA set up for it) of a parameter LoRA; None for a LoRA that does not fit.

    transformers 5 holds Qwen3-VL-MoE's expert stacks as (experts, out, in); the published checkpoints
    store (experts, in, out) and its conversion mapping transposes them on load when the shapes differ
    (`Transpose(1, 2, check_dims=True)`). The delta follows the same rule, so the merged folder loads as
    base + LoRA whichever layout the base has.
    """
    key = stored.get(parameter, (None, False))[0]
    if key is None or parameter not in parameters:
        return key, None
    model_shape = tuple(parameters[parameter].shape)
    experts = model_shape[0] if len(model_shape) == 3 else 1
    out_features, in_features = model_shape[-2:]
    rank, remainder = divmod(delta.down.shape[0], experts)
    if (
        remainder
        or tuple(delta.down.shape) != (rank * experts, in_features)
        or tuple(delta.up.shape) != (out_features, rank * experts)
    ):
        return key, None
    if shapes[key] == model_shape:
        transposed = False
    elif experts > 1 and shapes[key] == (experts, in_features, out_features):
        transposed = True
    else:
        return key, None
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    scaling = _lora_scaling(config, parameter, rank)
    return key, replace(delta, scaling=scaling, experts=experts, stored_transposed=transposed)


def _local_folder(base: str, hub_source: str, offline: bool, revision: str | None) -> Path:
    """The base model as a local folder: a hub ID is downloaded (safetensors and configs only)."""
    resolved = Path(resolve_qwenvl_model(base, hub_source, offline, revision))
    if resolved.is_dir():
        return resolved
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(resolved), revision=revision, allow_patterns=_HUB_PATTERNS))
    except OSError as error:
        raise ModelError(
            f"cannot download model {base}: {error}", hint="check the hub ID, or pass a local folder"
        ) from error


def _weight_shards(folder: Path, base: str) -> dict[str, list[str]]:
    """The base's safetensors files and the keys in each, in the index's order of files."""
    index_file = folder / SAFETENSORS_INDEX
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        shards: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            shards.setdefault(file, []).append(key)
        return shards
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return {single.name: list(handle.keys())}
    raise ModelError(
        f"model {base} has no safetensors weights ({folder})",
        hint="the merge reads safetensors only (pickle .bin files can run code on load); convert the base",
    )


def _write_shards(
    base_folder: Path,
    adapter_dir: Path,
    staging: Path,
    shards: dict[str, list[str]],
    plan: dict[str, LoraDelta],
    scale: float,
    dtype: torch.dtype,
) -> None:
    weight_map, total_size = {}, 0
    for file, keys in shards.items():
        with (
            safe_open(str(base_folder / file), framework="pt") as handle,
            SafetensorsStreamWriter(staging / file, {"format": "pt"}) as writer,
        ):
            for key in keys:
                tensor = handle.get_tensor(key)
                delta = plan.get(key)
                if delta is not None:
                    tensor = delta.fused(tensor, scale, dtype)
                    if not torch.isfinite(tensor).all():
                        raise _invalid_weights(adapter_dir, f"{key} holds NaN or inf")
                elif tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                writer.add(key, tensor)
                weight_map[key] = file
                total_size += tensor.numel() * tensor.element_size()
                del tensor
    if (base_folder / SAFETENSORS_INDEX).is_file():
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (staging / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _copy_configuration(base_folder: Path, staging: Path, dtype: torch.dtype) -> None:
    """config.json (with the merged dtype), generation config, tokenizer, processor, chat template."""
    for item in base_folder.iterdir():
        if item.is_file() and item.name not in _SKIPPED_FILES and not item.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(item, staging / item.name)
    config_file = staging / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # transformers 5 reads `dtype`; checkpoints saved by transformers 4 have `torch_dtype`.
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _refuse_existing_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not (output.is_dir() and not any(output.iterdir())) and not overwrite:
        raise ConfigError(
            f"merge output {output} already exists",
            hint="choose a new output folder, or pass --overwrite to replace it",
        )


def _merged_dtype(dtype: str | None, config_dict: dict[str, Any], base: str) -> torch.dtype:
    if dtype is None:
        # transformers 5 writes `dtype`; checkpoints saved by transformers 4 have `torch_dtype`.
        recorded = config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32"
        if recorded not in MERGED_DTYPES:
            raise ConfigError(
                f"the config of {base} records dtype {recorded!r}, which a merged model cannot be saved in",
                hint=f"pass --dtype with one of: {', '.join(MERGED_DTYPES)}",
            )
        return MERGED_DTYPES[recorded]
    if dtype not in MERGED_DTYPES:
        raise ConfigError(f"unknown merge dtype {dtype!r}", hint=f"use one of: {', '.join(MERGED_DTYPES)}")
    return MERGED_DTYPES[dtype]


def _with_record(write: Callable[[Path], None], record: dict[str, Any]) -> Callable[[Path], None]:
    """`write`, then `tuner_merge.json` (the record plus the library versions) into the same folder."""
    import peft
    import transformers

    import tuner

    def write_and_record(staging: Path) -> None:
        write(staging)
        versions = {
            "tuner_version": tuner.__version__,
            "transformers_version": transformers.__version__,
            "peft_version": peft.__version__,
        }
        (staging / MERGE_RECORD_FILE).write_text(
            json.dumps({**record, **versions}, indent=2) + "\n", encoding="utf-8"
        )

    return write_and_record
