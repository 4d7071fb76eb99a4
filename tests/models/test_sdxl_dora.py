"""SDXL DoRA (`lora.variant: dora`): the diffusers file loads as DoRA, merges to the same model, and the
kohya file's `dora_scale` makes ComfyUI's formula give PEFT's weight."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from formats.sdxl_lora_files import write_adapter

from tuner.errors import ModelError
from tuner.formats.kohya import export_kohya, kohya_text_encoder_name, read_safetensors, unet_kohya_names
from tuner.models import sdxl_merge
from tuner.models.sdxl import load_sdxl
from tuner.models.sdxl_infer import build_pipeline

TARGETS = "attention+ffn+conv"


@pytest.fixture(scope="module")
def dora_adapter(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dora")
    write_adapter(tiny_model("sdxl"), folder, targets=TARGETS, alpha=3.0, text_encoder=True, variant="dora")
    return folder


def _unet_output(unet: torch.nn.Module) -> torch.Tensor:
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    with torch.no_grad():
        return unet(
            torch.randn(1, config.in_channels, 16, 16, generator=generator),
            torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, 5, config.cross_attention_dim, generator=generator),
            added_cond_kwargs={
                "text_embeds": torch.randn(1, text_embeds, generator=generator),
                "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
            },
        ).sample


def _text_output(encoder: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return encoder(torch.tensor([[0, 5, 9, 3, 1]]), output_hidden_states=True).hidden_states[-2]


def _adapted_pipeline(model_folder, adapter_folder) -> StableDiffusionXLPipeline:
    pipeline = build_pipeline(load_sdxl(str(model_folder)))
    pipeline.load_lora_weights(str(adapter_folder), adapter_name="dora")
    return pipeline


def test_dora_file_loads_in_diffusers_as_dora_and_merged_equals_unmerged(tiny_model, dora_adapter, tmp_path):
    pipeline = _adapted_pipeline(tiny_model("sdxl"), dora_adapter)
    models = [pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2]
    saved, _ = read_safetensors(dora_adapter / "pytorch_lora_weights.safetensors")
    saved = {key.removesuffix(".weight"): value for key, value in saved.items()}
    for component, model in zip(("unet", "text_encoder", "text_encoder_2"), models, strict=True):
        # diffusers rebuilt DoRA layers with the saved magnitudes (a load that misses them leaves each
        # at its fresh initialisation, silently).
        loaded = {
            name: module.lora_magnitude_vector["dora"].weight
            for name, module in model.named_modules()
            if "dora" in getattr(module, "lora_variant", {})
        }
        assert loaded
        for name, magnitude in loaded.items():
            torch.testing.assert_close(
                magnitude, saved[f"{component}.{name}.lora_magnitude_vector"], msg=name
            )
    unmerged = [_unet_output(pipeline.unet), *(_text_output(e) for e in models[1:])]
    base = load_sdxl(str(tiny_model("sdxl")))
    assert (unmerged[0] - _unet_output(base.unet)).abs().max() > 1e-2

    merged_folder = sdxl_merge.merge_sdxl_adapter(
        str(tiny_model("sdxl")), dora_adapter, tmp_path / "merged", dtype="fp32"
    )
    merged = load_sdxl(str(merged_folder))
    outputs = [
        _unet_output(merged.unet),
        _text_output(merged.text_encoder),
        _text_output(merged.text_encoder_2),
    ]
    for ours, expected in zip(outputs, unmerged, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_single_file_merge_of_dora_streams_peft_s_merge(tiny_model, dora_adapter, tmp_path):
    from safetensors import safe_open

    from tuner.formats.sdxl_single_file import sdxl_original_state_dict

    base = str(tiny_model("sdxl"))
    folder = sdxl_merge.merge_sdxl_adapter(base, dora_adapter, tmp_path / "folder", scale=0.7, dtype="fp32")
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    expected = sdxl_original_state_dict(
        reference.unet, reference.vae, reference.text_encoder, reference.text_encoder_2
    )
    checkpoint = sdxl_merge.merge_sdxl_adapter(
        base, dora_adapter, tmp_path / "m.safetensors", scale=0.7, dtype="fp32", single_file=True
    )
    with safe_open(str(checkpoint), framework="pt") as handle:
        for key, value in expected.items():
            torch.testing.assert_close(handle.get_tensor(key), value, rtol=1e-5, atol=1e-6, msg=key)


def _comfyui_weight(weight, down, up, alpha, dora_scale) -> torch.Tensor:
    """ComfyUI's LoRA with an output-axis `dora_scale` (comfy/weight_adapter/base.py weight_decompose,
    strength 1): `(W + alpha/rank * up @ down) * dora_scale / ||W||` per output row."""
    delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / down.shape[0])
    norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(dora_scale.shape)
    return (weight + delta) * dora_scale / norm


def test_kohya_dora_export_gives_comfyui_peft_s_weight(tiny_model, dora_adapter, tmp_path):
    with pytest.raises(ModelError, match="DoRA"):
        export_kohya(dora_adapter, tmp_path / "no-base.safetensors")
    # The base the adapter records (tiny-sdxl), as `tuner convert --to kohya` finds it.
    kohya_file = export_kohya(
        dora_adapter,
        tmp_path / "k.safetensors",
        base_weight=sdxl_merge.dora_base_weights(dora_adapter, None),
    )
    tensors, header = read_safetensors(kohya_file)
    assert header["ss_network_module"] == "lycoris.kohya" and "dora_wd" in header["ss_network_args"]

    base = load_sdxl(str(tiny_model("sdxl")))
    pipeline = _adapted_pipeline(tiny_model("sdxl"), dora_adapter)
    pipeline.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], adapter_names=["dora"])
    pipeline.unload_lora_weights()
    unet_names = {module: name for name, module in unet_kohya_names(dict(base.unet.config)).items()}
    checked = set()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for name, module in getattr(base, component).named_modules():
            kohya = unet_names.get(name) if component == "unet" else kohya_text_encoder_name(component, name)
            if kohya is None or f"{kohya}.dora_scale" not in tensors:
                continue
            dora_scale = tensors[f"{kohya}.dora_scale"]
            assert dora_scale.shape == (module.weight.shape[0], *[1] * (module.weight.dim() - 1))
            ours = _comfyui_weight(
                module.weight.detach(),
                tensors[f"{kohya}.lora_down.weight"],
                tensors[f"{kohya}.lora_up.weight"],
                float(tensors[f"{kohya}.alpha"]),
                dora_scale,
            )
            expected = getattr(pipeline, component).get_submodule(name).weight.detach()
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5, msg=kohya)
            checked.add(kohya.split("_", 2)[1])
    assert checked == {"unet", "te1", "te2"}
    assert sum(key.endswith(".dora_scale") for key in tensors) == sum(
        key.endswith(".alpha") for key in tensors
    )
