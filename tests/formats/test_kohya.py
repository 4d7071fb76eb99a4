import json

import pytest
import torch
from formats.sdxl_lora_files import write_adapter

from tuner.formats.kohya import SDXL_BASE_UNET_CONFIG, export_kohya, import_kohya, read_safetensors
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


def test_kohya_header_carries_the_training_record_tools_display(tiny_model, adapter):
    from tuner.formats.kohya import base_unet_config, diffusers_to_kohya

    state_dict, metadata = read_safetensors(adapter / "pytorch_lora_weights.safetensors")
    tags = {"10_sks": {"sks style": 12, "red": 3}}
    record = {
        "tuner.base_model": "stabilityai/stable-diffusion-xl-base-1.0",
        "tuner.resolution": "1024",
        "tuner.steps": "1500",
        "tuner.epochs": "10",
        "tuner.images": "12",
        "tuner.caption_prefix": "sks style",
        "tuner.tag_frequency": json.dumps(tags),
        "tuner.variant": "lora",
    }
    unet_config = base_unet_config(str(tiny_model("sdxl")))
    _, header = diffusers_to_kohya(state_dict, {**metadata, **record}, unet_config, title="sks")
    assert header["ss_sd_model_name"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert header["ss_resolution"] == "(1024, 1024)" and header["modelspec.resolution"] == "1024x1024"
    assert header["ss_steps"] == header["ss_max_train_steps"] == "1500"
    assert header["ss_epoch"] == header["ss_num_epochs"] == "10"
    assert header["ss_num_train_images"] == "12"
    assert header["modelspec.trigger_phrase"] == "sks style"
    assert json.loads(header["ss_tag_frequency"]) == tags
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "3")
    assert header["tuner.variant"] == "lora" and header["ss_network_module"] == "networks.lora"


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


# ComfyUI's LORA_CLIP_MAP (comfy/lora.py): the CLIP layers kohya-format text-encoder LoRA names.
CLIP_LAYER_PARTS = ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj",
                    "self_attn_out_proj")  # fmt: skip
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _comfyui_key_map(model_folder) -> set[str]:
    """The kohya module names ComfyUI maps for an SDXL checkpoint (comfy/lora.py model_lora_keys_*).

    Text encoders: `lora_te1_text_model_encoder_layers_{b}_{part}` (CLIP-L) and `lora_te2_...` (bigG).
    UNet: `lora_unet_` + every `.weight` path of the original checkpoint under `model.diffusion_model.`,
    with `_` for `.`.
    """
    from tuner.formats.sdxl_single_file import UNET_PREFIX, sdxl_original_state_dict

    components = load_sdxl(str(model_folder))
    names = {
        f"lora_te{index}_text_model_encoder_layers_{layer}_{part}"
        for index, encoder in ((1, components.text_encoder), (2, components.text_encoder_2))
        for layer in range(encoder.config.num_hidden_layers)
        for part in CLIP_LAYER_PARTS
    }
    checkpoint = sdxl_original_state_dict(
        components.unet, components.vae, components.text_encoder, components.text_encoder_2
    )
    names |= {
        "lora_unet_" + key[len(UNET_PREFIX) : -len(".weight")].replace(".", "_")
        for key in checkpoint
        if key.startswith(UNET_PREFIX) and key.endswith(".weight")
    }
    return names


def test_every_kohya_key_family_is_named_as_comfyui_and_a1111_read_it(tiny_model, tmp_path):
    folder = tmp_path / "adapter"
    write_adapter(tiny_model("sdxl"), folder, targets="attention+ffn+conv", text_encoder=True)
    tensors, _ = read_safetensors(export_kohya(folder, tmp_path / "k.safetensors"))
    modules = {key.split(".", 1)[0] for key in tensors}
    assert all(key.endswith(KOHYA_SUFFIXES) for key in tensors)
    assert all(f"{module}{suffix}" in tensors for module in modules for suffix in KOHYA_SUFFIXES)
    unmapped = sorted(modules - _comfyui_key_map(tiny_model("sdxl")))
    assert not unmapped, unmapped[:5]  # what ComfyUI would log as "lora key not loaded"
    families = {prefix: sum(m.startswith(prefix) for m in modules) for prefix in ("lora_te1_", "lora_te2_")}
    # Tiny CLIP-L and bigG: 2 layers each, q/k/v/out adapted.
    assert families == {"lora_te1_": 8, "lora_te2_": 8}


def test_diffusers_kohya_loader_applies_unet_and_both_text_encoders_like_the_adapter(tiny_model, tmp_path):
    folder = tmp_path / "adapter"
    write_adapter(tiny_model("sdxl"), folder, targets="attention+ffn+conv", text_encoder=True, alpha=6.0)
    kohya_file = export_kohya(folder, tmp_path / "k.safetensors")

    def outputs(adapter_path):
        components = load_sdxl(str(tiny_model("sdxl")))
        pipeline = build_pipeline(components)
        if adapter_path is not None:
            load_adapters(pipeline, [Adapter(adapter_path)])
        with torch.no_grad():
            embeds, _, pooled, _ = pipeline.encode_prompt("a red square", do_classifier_free_guidance=False)
            generator = torch.Generator().manual_seed(0)
            latents = torch.randn(1, 4, 8, 8, generator=generator)
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
            noise = pipeline.unet(
                latents,
                torch.tensor([500]),
                encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            ).sample
        clip_l = pipeline.text_encoder.config.hidden_size  # embeds = CLIP-L's, then bigG's features
        return embeds[..., :clip_l], embeds[..., clip_l:], pooled, noise

    base = outputs(None)
    ours = outputs(folder)
    through_kohya = outputs(kohya_file)
    parts = ("CLIP-L", "bigG", "pooled (bigG)", "UNet")
    for name, b, o, k in zip(parts, base, ours, through_kohya, strict=True):
        assert (o - b).abs().max() > 1e-3, name  # each part is adapted...
        torch.testing.assert_close(k, o, rtol=1e-4, atol=1e-5, msg=name)  # ...and kohya's loader agrees


def _lora_file(path, unet_shapes: dict[str, tuple[int, ...]], header: dict[str, str]):
    """A diffusers-layout UNet LoRA of rank 2 for the named modules, with their weight shapes."""
    from safetensors.torch import save_file

    tensors = {}
    for module, shape in unet_shapes.items():
        tensors[f"unet.{module}.lora_A.weight"] = torch.randn(2, *shape[1:])
        tensors[f"unet.{module}.lora_B.weight"] = torch.randn(shape[0], 2, *([1] * (len(shape) - 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path


def _weight_shapes(config, modules):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return {module: tuple(unet.get_submodule(module).weight.shape) for module in modules}


def test_convert_names_modules_after_the_recorded_base_and_refuses_an_unknown_layout(
    tiny_model, tmp_path, capsys
):
    from diffusers import UNet2DConditionModel

    from tuner.cli.main import main
    from tuner.errors import ModelError

    # A UNet of another layout: one layer per block, so down level 1's first transformer is
    # input_blocks.3.1 (it is input_blocks.4.1 in SDXL base's layout).
    config = dict(UNet2DConditionModel.load_config(tiny_model("sdxl"), subfolder="unet"), layers_per_block=1)
    base = tmp_path / "base"
    (base / "unet").mkdir(parents=True)
    (base / "unet" / "config.json").write_text(json.dumps(config))
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    shapes = _weight_shapes(config, [module])

    recorded = _lora_file(tmp_path / "a" / "lora.safetensors", shapes, {"tuner.base_model": str(base)})
    main(["convert", "--to", "kohya", str(recorded), str(tmp_path / "a.safetensors")])
    tensors, _ = read_safetensors(tmp_path / "a.safetensors")
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha" in tensors

    # The run's tuner_config.yaml names the base when the header does not.
    in_run = _lora_file(tmp_path / "run" / "lora.safetensors", shapes, {})
    (tmp_path / "run" / "tuner_config.yaml").write_text(f"model:\n  name_or_path: {base}\n")
    tensors, _ = read_safetensors(export_kohya(in_run, tmp_path / "run.safetensors"))
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha" in tensors

    # Nothing recorded and shapes that are not SDXL base's: refused, not renamed wrongly.
    unknown = _lora_file(tmp_path / "u" / "lora.safetensors", shapes, {})
    with pytest.raises(ModelError, match="cannot tell the UNet layout") as refused:
        export_kohya(unknown, tmp_path / "u.safetensors")
    assert "--base" in refused.value.hint
    assert not (tmp_path / "u.safetensors").exists()
    main(["convert", "--to", "kohya", "--base", str(base), str(unknown), str(tmp_path / "u.safetensors")])
    assert "input_blocks_3_1" in next(iter(read_safetensors(tmp_path / "u.safetensors")[0]))

    # Nothing recorded, but every LoRA fits SDXL base: the keys tell, SDXL base's names.
    sdxl_shapes = _weight_shapes(SDXL_BASE_UNET_CONFIG, [module, "mid_block.resnets.0.conv1"])
    fits = _lora_file(tmp_path / "s" / "lora.safetensors", sdxl_shapes, {})
    tensors, _ = read_safetensors(export_kohya(fits, tmp_path / "s.safetensors"))
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha",
            "lora_unet_middle_block_0_in_layers_2.alpha"} <= set(tensors)  # fmt: skip
    # ...and back: a kohya file without a recorded base is checked the same way.
    with pytest.raises(ModelError, match="is not in SDXL base's UNet") as refused:
        import_kohya(tmp_path / "u.safetensors", tmp_path / "u-back")
    assert "--base" in refused.value.hint


def _sd_scripts_hashes(path):
    """kohya-ss/sd-scripts library/train_util.py, as its train_network.py fills `ss_sd_model_hash` and
    `ss_new_sd_model_hash`: `model_hash` (sha256 of 0x10000 bytes from 0x100000, 8 hex digits) and
    `calculate_sha256` (the whole file, read in 1 MiB blocks)."""
    import hashlib

    with open(path, "rb") as file:
        file.seek(0x100000)
        old = hashlib.sha256(file.read(0x10000)).hexdigest()[0:8]
    new = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1024 * 1024), b""):
            new.update(chunk)
    return old, new.hexdigest()


def test_base_model_hashes_are_the_ones_kohya_records(tmp_path):
    from tuner.formats.kohya import base_model_hashes

    checkpoint = tmp_path / "base.safetensors"
    checkpoint.write_bytes(torch.randint(0, 256, (3 * 1024 * 1024 + 7,), dtype=torch.uint8).numpy().tobytes())
    old, new = _sd_scripts_hashes(checkpoint)
    assert base_model_hashes(str(checkpoint)) == {"base_model_hash": old, "base_model_sha256": new}
    assert base_model_hashes(str(tmp_path)) == {} and base_model_hashes("stabilityai/sdxl") == {}


def test_kohya_header_carries_the_base_hashes_under_kohyas_keys(tiny_model, tmp_path):
    from tuner.formats.kohya import base_unet_config
    from tuner.models.sdxl_lora import _add_header_metadata

    adapter_file = write_adapter(tiny_model("sdxl"), tmp_path / "run", base_model="/models/base.safetensors")
    _add_header_metadata(
        adapter_file, {"tuner.base_model_hash": "0123abcd", "tuner.base_model_sha256": "ef" * 32}
    )
    kohya_file = export_kohya(
        adapter_file, tmp_path / "style.safetensors", unet_config=base_unet_config("tiny")
    )
    _, header = read_safetensors(kohya_file)
    assert header["ss_sd_model_name"] == "/models/base.safetensors"
    assert header["ss_sd_model_hash"] == "0123abcd" and header["ss_new_sd_model_hash"] == "ef" * 32


def test_adapter_files_and_conversions_get_the_umask_modes(tiny_model, tmp_path):
    import os
    import stat

    previous = os.umask(0o027)
    try:
        adapter_file = write_adapter(tiny_model("sdxl"), tmp_path / "run")
        kohya_file = export_kohya(adapter_file, tmp_path / "kohya" / "style.safetensors")
        back = import_kohya(kohya_file, tmp_path / "back")
    finally:
        os.umask(previous)
    written = [adapter_file, kohya_file, back]
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == {
        path.name: oct(0o640) for path in written
    }
