"""What every recipe does alike: the base model's record, and where a finished run's adapter is."""

from __future__ import annotations

from pathlib import Path

import pytest
from formats.sdxl_lora_files import write_adapter

from tuner.config.schema import RunConfig
from tuner.formats.kohya import base_unet_config, export_kohya
from tuner.recipes.common import resolve_base_model, where_the_adapter_is


def test_a_local_base_is_recorded_by_its_absolute_path_a_hub_id_as_given(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(tiny_model("sdxl")).parent)
    local = RunConfig.model_validate(
        {"task": "sdxl-lora", "model": {"name_or_path": Path(tiny_model("sdxl")).name}}
    )
    assert resolve_base_model(local, "sdxl-lora")[1] == str(Path(tiny_model("sdxl")).resolve())
    tiny = RunConfig.model_validate({"task": "sdxl-lora", "model": {"name_or_path": "tiny"}})
    assert resolve_base_model(tiny, "sdxl-lora")[1] == "tiny-sdxl"


@pytest.mark.parametrize("variant", ["lora", "lokr"])
def test_an_sdxl_run_says_which_file_comfyui_and_diffusers_take(tiny_model, tmp_path, variant):
    adapter_file = write_adapter(tiny_model("sdxl"), tmp_path, variant=variant)
    kohya_file = export_kohya(
        adapter_file, tmp_path / "pytorch_lora_weights_kohya.safetensors", base_unet_config("tiny")
    )
    lines = where_the_adapter_is(tmp_path)
    assert f"ComfyUI, A1111, Forge (their LoRA folder): {kohya_file}" in lines
    # diffusers reads the LoRA file, not tuner's LoKr file (PEFT names): that one is for tuner alone.
    readers = "diffusers (load_lora_weights), tuner infer/merge" if variant == "lora" else "tuner infer/merge"
    assert f"{readers}: {adapter_file}" in lines
    assert len(lines) == 2
