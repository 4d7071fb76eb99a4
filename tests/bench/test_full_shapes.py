"""`--scale full` builds the real architectures: parameter counts equal the published models'.

Counted on the meta device, so nothing is allocated. The reference counts are those of the released
checkpoints (stabilityai/stable-diffusion-xl-base-1.0, Qwen/Qwen2.5-VL-3B-Instruct).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, Qwen2_5_VLForConditionalGeneration

from tuner.bench.qwenvl_bench import qwenvl_config
from tuner.bench.sdxl_shapes import sdxl_configs


def _parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_full_sdxl_has_the_parameter_counts_of_sdxl_base():
    configs = sdxl_configs("full")
    with torch.device("meta"):
        assert _parameters(UNet2DConditionModel.from_config(configs.unet)) == 2_567_463_684
        assert _parameters(CLIPTextModel(configs.text_encoder)) == 123_060_480
        assert _parameters(CLIPTextModelWithProjection(configs.text_encoder_2)) == 694_659_840
        assert _parameters(AutoencoderKL.from_config(configs.vae)) == 83_653_863


def test_full_qwenvl_has_the_parameter_count_of_qwen25_vl_3b():
    config = qwenvl_config("full")
    with torch.device("meta"):
        assert _parameters(Qwen2_5_VLForConditionalGeneration(config)) == 3_754_622_976
