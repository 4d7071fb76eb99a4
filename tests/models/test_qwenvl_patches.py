"""The Qwen-VL fast paths compute what the unpatched models compute."""

from __future__ import annotations

import pytest
import torch

from tuner.models.qwenvl import SUPPORTED_MODEL_TYPES, detect_family
from tuner.models.qwenvl_patches import (
    FusedOps,
    LinearPatchEmbedding,
    apply_npu_fused_kernels,
    linear_patch_embed,
    reference_ops,
)

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def load_tiny(tiny_model, name: str) -> torch.nn.Module:
    folder = tiny_model(name)
    model = SUPPORTED_MODEL_TYPES[detect_family(folder)].from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def image_inputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened patches of one 4x6-patch image, as the processor hands them to the vision tower."""
    vision = model.config.vision_config
    patch_values = 3 * vision.temporal_patch_size * vision.patch_size**2
    grid = torch.tensor([[1, 4, 6]])
    return torch.randn(int(grid.prod()), patch_values), grid


def text_and_image_batch(model: torch.nn.Module) -> dict:
    pixel_values, grid = image_inputs(model)
    merge = model.config.vision_config.spatial_merge_size
    image_tokens = int(grid.prod()) // merge**2
    config = model.config
    ids = [1, 2, config.vision_start_token_id, *[config.image_token_id] * image_tokens]
    ids += [config.vision_end_token_id, 5, 6, 7, 8]
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
        # As the processor marks them: 1 on image tokens (the M-RoPE position ids follow from it).
        "mm_token_type_ids": (input_ids == config.image_token_id).long(),
        "labels": input_ids,
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_linear_patch_embedding_matches_the_conv3d(tiny_model, name):
    torch.manual_seed(0)
    model = load_tiny(tiny_model, name)
    patch_embed = model.model.visual.patch_embed
    pixel_values, _ = image_inputs(model)
    expected = patch_embed(pixel_values)

    assert linear_patch_embed(model) == 1
    assert isinstance(patch_embed.proj, LinearPatchEmbedding)
    torch.testing.assert_close(patch_embed(pixel_values), expected, rtol=1e-5, atol=1e-5)
    assert linear_patch_embed(model) == 0


def test_linear_patch_embedding_keeps_the_whole_model_output(tiny_model):
    torch.manual_seed(0)
    model = load_tiny(tiny_model, "qwen2.5-vl")
    batch = text_and_image_batch(model)
    with torch.no_grad():
        expected = model(**batch).logits
        linear_patch_embed(model)
        patched = model(**batch).logits
    # fp32 summation order differs between the conv and the GEMM; the tiny model's logits are large
    # (initializer range 0.3), so the bound is relative to their scale.
    torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_linear_patch_embedding_rejects_an_overlapping_conv():
    with pytest.raises(ValueError, match="stride == kernel"):
        LinearPatchEmbedding(torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(1, 2, 2)))


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_kernels_patch_with_reference_ops_keeps_loss_and_gradients(tiny_model, name):
    torch.manual_seed(0)
    model = load_tiny(tiny_model, name)
    batch = text_and_image_batch(model)
    expected_loss = model(**batch).loss
    expected_loss.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    calls = {"rms_norm": 0, "rotary_mul": 0, "swiglu": 0}
    reference = reference_ops()

    def counted(name, op):
        def call(*args):
            calls[name] += 1
            return op(*args)

        return call

    ops = FusedOps(**{field: counted(field, getattr(reference, field)) for field in calls})
    patch = apply_npu_fused_kernels(model, ops)
    try:
        loss = model(**batch).loss
        loss.backward()
    finally:
        patch.remove()

    text_config = model.config.text_config
    assert patch.rms_norms >= 2 * text_config.num_hidden_layers + 1
    assert patch.mlps >= text_config.num_hidden_layers
    assert all(count > 0 for count in calls.values()), calls
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for parameter_name, parameter in model.named_parameters():
        if parameter_name in expected_grads:
            torch.testing.assert_close(parameter.grad, expected_grads[parameter_name], rtol=1e-4, atol=1e-5)


def test_removing_the_fused_kernels_patch_restores_the_original_code(tiny_model):
    model = load_tiny(tiny_model, "qwen2.5-vl")
    batch = text_and_image_batch(model)
    patch = apply_npu_fused_kernels(model, reference_ops())
    patch.remove()
    forwards = [module for module in model.modules() if "forward" in vars(module)]
    assert forwards == []
    calls = []
    poisoned = FusedOps(*(lambda *args: calls.append(args) for _ in range(3)))
    apply_npu_fused_kernels(model, poisoned).remove()
    with torch.no_grad():
        model(**batch)
    assert calls == []


def test_reference_ops_match_the_model_formulas():
    torch.manual_seed(0)
    ops = reference_ops()
    x = torch.randn(3, 5, 8, dtype=torch.bfloat16)
    weight = torch.randn(8)
    x32 = x.float()
    expected = weight * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), expected)
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(ops.swiglu(torch.cat((gate, up), -1)), gate * torch.sigmoid(gate) * up)
    q, cos, sin = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    rotated = torch.cat((-q[:, 2:], q[:, :2]), -1)
    torch.testing.assert_close(ops.rotary_mul(q, cos, sin), q * cos + rotated * sin)


def test_fast_paths_follow_the_model_options(tiny_model):
    from tuner.config.schema import ModelConfig
    from tuner.errors import ConfigError
    from tuner.models.qwenvl_patches import apply_fast_paths

    model = load_tiny(tiny_model, "qwen2-vl")
    apply_fast_paths(model, "qwen2_vl", "cpu", ModelConfig(linear_patch_embed=False))
    assert isinstance(model.model.visual.patch_embed.proj, torch.nn.Conv3d)
    apply_fast_paths(model, "qwen2_vl", "cpu", ModelConfig())
    assert isinstance(model.model.visual.patch_embed.proj, LinearPatchEmbedding)
    with pytest.raises(ConfigError, match="npu_fused_kernels"):
        apply_fast_paths(model, "qwen2_vl", "cpu", ModelConfig(npu_fused_kernels=True))
