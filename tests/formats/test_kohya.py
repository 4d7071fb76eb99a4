import pytest
import torch
from formats.sdxl_lora_files import write_adapter

from tuner.formats.kohya import export_kohya, import_kohya, read_safetensors
from tuner.models.sdxl import load_sdxl
from tuner.models.sdxl_infer import Adapter, GenerationSettings, build_pipeline, generate, load_adapters


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    write_adapter(tiny_model("sdxl"), folder, rank=4, alpha=3.0)
    return folder


def _render(model_folder, adapter_path):
    components = load_sdxl(str(model_folder))
    pipeline = build_pipeline(components)
    load_adapters(pipeline, [Adapter(adapter_path)])
    settings = GenerationSettings(prompt="a red square", steps=2, size=(64, 64), guidance=1.0)
    return torch.tensor(list(generate(pipeline, components, settings)[0].getdata()), dtype=torch.float32)


def test_kohya_export_names_alpha_and_header(adapter, tmp_path):
    kohya_file = export_kohya(adapter, tmp_path / "style.safetensors")
    tensors, header = read_safetensors(kohya_file)
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(tensors)
    assert "lora_unet_output_blocks_3_1_transformer_blocks_0_ff_net_2.alpha" in tensors
    assert not any("down_blocks" in key for key in tensors)
    assert float(tensors[f"{name}.alpha"]) == 3.0
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "3"
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header["modelspec.title"] == "style"


def test_kohya_round_trip_gives_identical_tensors(adapter, tmp_path):
    kohya_file = export_kohya(adapter, tmp_path / "k.safetensors")
    back = import_kohya(kohya_file, tmp_path / "back")
    original, original_header = read_safetensors(adapter / "pytorch_lora_weights.safetensors")
    converted, header = read_safetensors(back)
    assert converted.keys() == original.keys()
    for key in original:
        assert torch.equal(converted[key], original[key]), key
    assert header["tuner.base_model"] == original_header["tuner.base_model"]
    again, _ = read_safetensors(export_kohya(back, tmp_path / "k2.safetensors"))
    assert float(again["lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.alpha"]) == 3.0


def test_diffusers_kohya_loader_renders_our_export_like_our_adapter(tiny_model, adapter, tmp_path):
    kohya_file = export_kohya(adapter, tmp_path / "k.safetensors")
    ours = _render(tiny_model("sdxl"), adapter)
    through_kohya = _render(tiny_model("sdxl"), kohya_file)
    base_components = load_sdxl(str(tiny_model("sdxl")))
    base = generate(
        build_pipeline(base_components),
        base_components,
        GenerationSettings(prompt="a red square", steps=2, size=(64, 64), guidance=1.0),
    )[0]
    base = torch.tensor(list(base.getdata()), dtype=torch.float32)
    assert (ours - base).abs().max() > 5  # the adapter visibly changes the image...
    assert (ours - through_kohya).abs().max() <= 1  # ...and kohya's loader applies it at the same scale
