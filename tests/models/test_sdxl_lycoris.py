"""SDXL LoKr and LoHa (`lora.variant: lokr | loha`): tuner's file loads through PEFT, merges to the same
model, and the kohya file's tensors give ComfyUI's formulas PEFT's weights."""

from __future__ import annotations

import pytest
import torch
from formats.sdxl_lora_files import write_adapter
from safetensors import safe_open

from tuner.formats.kohya import export_kohya, kohya_text_encoder_name, read_safetensors, unet_kohya_names
from tuner.formats.sdxl_single_file import UNET_PREFIX
from tuner.formats.sdxl_unet_layout import UNetLayout
from tuner.models import sdxl_merge
from tuner.models.sdxl import load_sdxl
from tuner.models.sdxl_infer import Adapter, build_pipeline, load_adapters

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _outputs(components) -> list[torch.Tensor]:
    unet = components.unet
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    tokens = torch.tensor([[0, 5, 9, 3, 1]])
    with torch.no_grad():
        return [
            unet(
                torch.randn(1, config.in_channels, 16, 16, generator=generator),
                torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 5, config.cross_attention_dim, generator=generator),
                added_cond_kwargs={
                    "text_embeds": torch.randn(1, text_embeds, generator=generator),
                    "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
                },
            ).sample,
            *(
                encoder(tokens).last_hidden_state
                for encoder in (components.text_encoder, components.text_encoder_2)
            ),
        ]


def _comfyui_delta(tensors: dict[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    """ComfyUI's LoHa/LoKr weight delta at strength 1 (comfy/weight_adapter loha.py, lokr.py)."""
    get = lambda key: tensors.get(f"{name}.{key}")  # noqa: E731
    alpha = get("alpha")
    if get("hada_w1_a") is not None:
        delta = (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b"))
        return delta.reshape(shape) * (float(alpha) / get("hada_w1_b").shape[0])
    dim = None
    w1 = get("lokr_w1")
    if w1 is None:
        dim, w1 = get("lokr_w1_b").shape[0], get("lokr_w1_a") @ get("lokr_w1_b")
    w2 = get("lokr_w2")
    if w2 is None:
        dim, w2 = get("lokr_w2_b").shape[0], get("lokr_w2_a") @ get("lokr_w2_b")
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lokr", "loha"])
def test_lycoris_adapter_infers_merges_and_exports_like_peft(tiny_model, tmp_path, variant):
    base_folder = tiny_model("sdxl")
    adapter = tmp_path / "adapter"
    write_adapter(base_folder, adapter, targets="attention+ffn+conv", text_encoder=True, variant=variant)

    base = load_sdxl(str(base_folder))
    pipeline = build_pipeline(load_sdxl(str(base_folder)))
    load_adapters(pipeline, [Adapter(adapter, 1.0)])
    unmerged = _outputs(pipeline)
    for ours, plain in zip(unmerged, _outputs(base), strict=True):
        assert (ours - plain).abs().max() > 1e-3  # every part is adapted

    merged_folder = sdxl_merge.merge_sdxl_adapter(
        str(base_folder), adapter, tmp_path / "merged", dtype="fp32"
    )
    merged = load_sdxl(str(merged_folder))
    for ours, expected in zip(_outputs(merged), unmerged, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)

    checkpoint = sdxl_merge.merge_sdxl_adapter(
        str(base_folder), adapter, tmp_path / "m.safetensors", dtype="fp32", single_file=True
    )
    layout = UNetLayout(merged.unet.config)
    with safe_open(str(checkpoint), framework="pt") as handle:
        for key, value in merged.unet.state_dict().items():
            torch.testing.assert_close(
                handle.get_tensor(UNET_PREFIX + layout.to_original(key)), value, msg=key
            )

    # The kohya file, named after the base the adapter records (as `tuner convert --to kohya`).
    tensors, header = read_safetensors(export_kohya(adapter, tmp_path / "k.safetensors"))
    assert header["ss_network_module"] == "lycoris.kohya" and variant in header["ss_network_args"]
    unet_names = {module: name for name, module in unet_kohya_names(dict(base.unet.config)).items()}
    checked = 0
    for component in COMPONENTS:
        merged_modules = dict(getattr(merged, component).named_modules())
        for module_name, module in getattr(base, component).named_modules():
            name = (
                unet_names.get(module_name)
                if component == "unet"
                else kohya_text_encoder_name(component, module_name)
            )
            if name is None or not any(key.startswith(f"{name}.") for key in tensors):
                continue
            expected = merged_modules[module_name].weight - module.weight
            ours = _comfyui_delta(tensors, name, module.weight.shape)
            torch.testing.assert_close(ours, expected.detach(), rtol=1e-4, atol=1e-5, msg=name)
            checked += 1
    assert checked == len({key.split(".", 1)[0] for key in tensors})
