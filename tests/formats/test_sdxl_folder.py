"""SDXL diffusers folders that tuner writes (tiny model, `tuner merge` folder output) in the published
layout, checked with ComfyUI's own rules for reading text encoders, and with the modes the umask gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from formats.sdxl_lora_files import write_adapter
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from tuner.formats.sdxl_folder import save_sdxl_folder
from tuner.models.sdxl_merge import merge_sdxl_adapter

CLIP_L, CLIP_H, CLIP_G = "CLIP_L", "CLIP_H", "CLIP_G"


def comfy_detect_te_model(keys: set[str]) -> str | None:
    """ComfyUI 0.3.64 comfy/sd.py `detect_te_model`, its CLIP branches (commit a125cd84)."""
    if "text_model.encoder.layers.30.mlp.fc1.weight" in keys:
        return CLIP_G
    if "text_model.encoder.layers.22.mlp.fc1.weight" in keys:
        return CLIP_H
    if "text_model.encoder.layers.0.mlp.fc1.weight" in keys:
        return CLIP_L
    return None


def comfy_sdxl_encoder_for(keys: set[str]) -> str:
    """comfy/sdxl_clip.py `SDXLClipModel.load_sd`: which of its two encoders a text-encoder file goes to."""
    return "clip_g" if "text_model.encoder.layers.30.mlp.fc1.weight" in keys else "clip_l"


def comfy_clip_parameter_names(num_layers: int) -> set[str]:
    """The state-dict names of ComfyUI's `comfy/clip_model.py` `CLIPTextModel` (text_model: embeddings,
    encoder.layers of CLIPLayer, final_layer_norm; text_projection beside it), which
    `SDClipModel.load_sd` loads with `load_state_dict(strict=False)`."""
    layer = [
        f"{part}.{kind}"
        for part in (
            "layer_norm1",
            "layer_norm2",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "mlp.fc1",
            "mlp.fc2",
        )
        for kind in ("weight", "bias")
    ]
    return {
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
        "text_projection.weight",
        *(f"text_model.encoder.layers.{index}.{name}" for index in range(num_layers) for name in layer),
    }


def _keys(encoder_folder: Path) -> set[str]:
    with safe_open(str(encoder_folder / "model.safetensors"), framework="pt") as handle:
        return {key for key in handle.keys() if not key.endswith("position_ids")}  # noqa: SIM118


def assert_comfyui_loads_both_encoders(folder: Path, clip_g_layers: int) -> None:
    clip_l, clip_g = _keys(folder / "text_encoder"), _keys(folder / "text_encoder_2")
    assert comfy_detect_te_model(clip_l) == CLIP_L and comfy_sdxl_encoder_for(clip_l) == "clip_l"
    layers_l = CLIPTextModel.config_class.from_pretrained(folder / "text_encoder").num_hidden_layers
    # Nothing ComfyUI's CLIP-L needs is missing but the projection (CLIP-L has none; nor do the published
    # files), nothing is left unread.
    assert comfy_clip_parameter_names(layers_l) - clip_l == {"text_projection.weight"}
    assert clip_l <= comfy_clip_parameter_names(layers_l)
    assert clip_g == comfy_clip_parameter_names(clip_g_layers)
    if clip_g_layers > 30:
        assert comfy_detect_te_model(clip_g) == CLIP_G and comfy_sdxl_encoder_for(clip_g) == "clip_g"


def _assert_same_weights(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_the_tiny_sdxl_folder_has_the_published_text_encoder_layout(tiny_model):
    assert_comfyui_loads_both_encoders(Path(tiny_model("sdxl")), clip_g_layers=2)


def test_a_full_depth_bigg_is_told_apart_from_clip_l_and_both_load_back_in_diffusers(tiny_model, tmp_path):
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model("sdxl"))
    # bigG's depth (32 layers), at the tiny width: ComfyUI tells the encoders apart by layer 30.
    config = pipeline.text_encoder_2.config
    config.num_hidden_layers = 32
    pipeline.register_modules(text_encoder_2=CLIPTextModelWithProjection(config).eval())
    folder = save_sdxl_folder(pipeline, tmp_path / "deep")
    assert_comfyui_loads_both_encoders(folder, clip_g_layers=32)
    reloaded = StableDiffusionXLPipeline.from_pretrained(folder)
    _assert_same_weights(reloaded.text_encoder, pipeline.text_encoder)
    _assert_same_weights(reloaded.text_encoder_2, pipeline.text_encoder_2)


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_merge_folder_output_is_comfyui_readable_and_readable_by_the_group(
    tiny_model, tmp_path, umask_027, monkeypatch
):
    base = Path(tiny_model("sdxl"))
    # Training records a local base by its absolute path; the same base given relatively is no other model.
    adapter = write_adapter(base, tmp_path / "adapter", text_encoder=True, base_model=str(base.resolve()))
    monkeypatch.chdir(base.parent)
    warnings: list[str] = []
    merged = merge_sdxl_adapter(base.name, adapter, tmp_path / "merged", warn=warnings.append)
    assert warnings == []
    assert_comfyui_loads_both_encoders(merged, clip_g_layers=2)
    single = merge_sdxl_adapter(
        str(tiny_model("sdxl")), adapter, tmp_path / "one.safetensors", single_file=True
    )
    adapter_files = list((tmp_path / "adapter").iterdir())
    modes = {
        path.relative_to(tmp_path): stat.S_IMODE(path.stat().st_mode)
        for path in [merged, *merged.rglob("*"), single, *adapter_files]
    }
    expected = {path: 0o750 if (tmp_path / path).is_dir() else 0o640 for path in modes}
    assert modes == expected
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter", "merged", "one.safetensors"]
