"""Merge a Qwen-VL LoRA adapter into its base model: one plain transformers folder, no PEFT needed to load it.

The merged folder holds what a serving stack reads: the weights (safetensors), config.json,
generation_config.json, the processor (image and video processor configs), the tokenizer files and the
chat template. The processor comes from the adapter folder when tuner saved one there (the one the
adapter was trained with), else from the base model.

Safety: an adapter recorded for another model family, or whose LoRA shapes do not fit the base, is
refused before anything is written; the merge is written to a temporary folder beside `output` and
moved into place in one `os.replace`, so a failed or interrupted merge leaves no output folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft.helpers import rescale_adapter_scale
from transformers import PreTrainedModel, ProcessorMixin

from tuner.errors import ConfigError, ModelError
from tuner.models.qwenvl import detect_family, load_qwenvl, read_config_dict
from tuner.models.qwenvl_infer import (
    apply_adapter,
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
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Merge `adapter_dir` into `base` with the adapter scaled by `scale`; returns the output folder.

    The merge runs in fp32; the merged weights are then cast to `dtype` (float32, bfloat16, float16;
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

    base_path = resolve_qwenvl_model(base, hub_source, offline, revision)
    config_dict = read_config_dict(base_path, revision)
    check_adapter_family(adapter_dir, detect_family(config_dict), base)
    merged_dtype = _merged_dtype(dtype, config_dict, base)

    model, processor, family = load_qwenvl(
        base_path,
        dtype=torch.float32,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        revision=revision,
    )
    peft_model = apply_adapter(model, family, base, adapter_dir)
    processor = load_processor_of(adapter_dir) or processor
    # rescale_adapter_scale multiplies every LoRA layer's `scaling` (alpha / r) for the duration of the
    # block, and merging reads `scaling`, so the merged delta is scale * B @ A * alpha / r.
    with rescale_adapter_scale(peft_model, scale):
        try:
            merged = peft_model.merge_and_unload(safe_merge=True)
        except ValueError as error:  # peft 0.21: safe_merge found NaN/inf in a merged weight
            raise ModelError(
                f"merging adapter {adapter_dir} produced invalid weights: {error}",
                hint="the adapter holds NaN/inf values; merge an earlier checkpoint of the run",
            ) from error
    merged.to(merged_dtype)

    record = {
        "base_model": base,
        "adapter": str(adapter_dir.resolve()),
        "adapter_base_model": read_adapter_record(adapter_dir).get("base_model"),
        "family": family,
        "scale": scale,
        "dtype": str(merged_dtype).removeprefix("torch."),
    }
    _write_atomically(output, merged, processor, record, overwrite)
    return output


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


def _write_atomically(
    output: Path, model: PreTrainedModel, processor: ProcessorMixin, record: dict[str, Any], overwrite: bool
) -> None:
    """Save everything into a hidden folder beside `output`, then move it into place in one rename."""
    import peft
    import transformers

    import tuner

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.merging-", dir=output.parent))
    replaced = staging.with_name(staging.name + "-replaced")
    try:
        model.save_pretrained(str(staging))
        processor.save_pretrained(str(staging))
        versions = {
            "tuner_version": tuner.__version__,
            "transformers_version": transformers.__version__,
            "peft_version": peft.__version__,
        }
        (staging / MERGE_RECORD_FILE).write_text(
            json.dumps({**record, **versions}, indent=2) + "\n", encoding="utf-8"
        )
        if output.exists() and overwrite:
            os.replace(output, replaced)
        try:
            os.replace(staging, output)
        except OSError:
            if replaced.exists():
                os.replace(replaced, output)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if replaced.is_dir():
            shutil.rmtree(replaced, ignore_errors=True)
        elif replaced.exists():
            replaced.unlink()
