import torch

from tuner.formats.kohya import SDXL_BASE_UNET_CONFIG, unet_kohya_names
from tuner.formats.sdxl_unet_layout import UNetLayout


def test_every_lora_target_of_full_size_sdxl_maps_to_a_kohya_name_and_back():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_BASE_UNET_CONFIG)
    targets = [name for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    kohya = unet_kohya_names(SDXL_BASE_UNET_CONFIG)
    assert sorted(kohya.values()) == sorted(targets)  # a bijection: no two modules share a kohya name
    layout = UNetLayout(unet.config)
    for name in [n for n, _ in unet.named_parameters()]:
        assert layout.to_diffusers(layout.to_original(name)) == name
    # Names sd-scripts writes for SDXL (original UNet numbering, not diffusers' down_blocks).
    assert kohya["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    assert kohya["lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2"] == (
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2"
    )
    assert kohya["lora_unet_middle_block_1_proj_in"] == "mid_block.attentions.0.proj_in"
    assert kohya["lora_unet_middle_block_2_in_layers_2"] == "mid_block.resnets.1.conv1"
    assert kohya["lora_unet_output_blocks_2_2_conv"] == "up_blocks.0.upsamplers.0.conv"
    assert kohya["lora_unet_output_blocks_5_2_conv"] == "up_blocks.1.upsamplers.0.conv"
    assert kohya["lora_unet_input_blocks_3_0_op"] == "down_blocks.0.downsamplers.0.conv"
    assert kohya["lora_unet_output_blocks_8_0_skip_connection"] == "up_blocks.2.resnets.2.conv_shortcut"


def test_layout_follows_the_config_not_one_size():
    config = {
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
    }
    layout = UNetLayout(config)
    assert layout.to_original("down_blocks.0.attentions.0.proj_in") == "input_blocks.1.1.proj_in"
    assert layout.to_original("down_blocks.0.downsamplers.0.conv") == "input_blocks.2.0.op"
    assert layout.to_original("down_blocks.1.resnets.0.conv1") == "input_blocks.3.0.in_layers.2"
    # An up level without attention carries its upsampler at .1.
    assert layout.to_original("up_blocks.0.upsamplers.0.conv") == "output_blocks.1.1.conv"
    assert layout.to_original("up_blocks.1.attentions.1.proj_out") == "output_blocks.3.1.proj_out"
