"""The tiny models load through the ordinary from_pretrained path, have the real structure, and rebuild
bit-identically; the cache is versioned and safe against concurrent builders."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tuner.errors import ModelError
from tuner.tiny import TINY_MODELS, build_tiny, resolve_tiny_alias

QWEN_FAMILIES = {
    "qwen2-vl": ("Qwen2VLForConditionalGeneration", "qwen2_vl"),
    "qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
    "qwen3-vl": ("Qwen3VLForConditionalGeneration", "qwen3_vl"),
    "qwen3-vl-moe": ("Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe"),
}


def test_unknown_name_raises_model_error_listing_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as raised:
        build_tiny("llama", root=tmp_path)
    assert "llama" in raised.value.message
    assert all(name in raised.value.hint for name in TINY_MODELS)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("name_or_path", "task", "expected"),
    [
        ("tiny", "sdxl-lora", "sdxl"),
        ("tiny", "qwenvl-lora", "qwen2.5-vl"),
        ("tiny-sdxl", "sdxl-lora", "sdxl"),
        ("tiny-qwen2-vl", "qwenvl-lora", "qwen2-vl"),
        ("tiny-qwen2.5-vl", "qwenvl-lora", "qwen2.5-vl"),
        ("tiny-qwen3-vl", "qwenvl-lora", "qwen3-vl"),
        ("tiny-qwen3-vl-moe", "qwenvl-lora", "qwen3-vl-moe"),
        ("tiny-llama", "qwenvl-lora", None),
        ("Qwen/Qwen2.5-VL-3B-Instruct", "qwenvl-lora", None),
        ("./tiny", "sdxl-lora", None),
    ],
)
def test_resolve_tiny_alias(name_or_path: str, task: str, expected: str | None) -> None:
    assert resolve_tiny_alias(name_or_path, task) == expected


def test_built_folder_is_versioned_and_reused(tiny_model) -> None:
    folder = tiny_model("qwen2-vl")
    weights = folder / "model.safetensors"
    modified = weights.stat().st_mtime_ns
    assert folder.name.startswith("qwen2-vl-v")
    assert build_tiny("qwen2-vl", root=folder.parent) == folder
    assert weights.stat().st_mtime_ns == modified


def test_default_root_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_TINY_DIR", str(tmp_path))
    assert build_tiny("qwen3-vl").parent == tmp_path


def test_concurrent_builders_share_one_complete_folder(tmp_path: Path) -> None:
    folders: list[Path] = []

    def build() -> None:
        folders.append(build_tiny("qwen3-vl", root=tmp_path))

    builders = [threading.Thread(target=build) for _ in range(3)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    assert len(folders) == 3 and len(set(folders)) == 1
    assert (folders[0] / "model.safetensors").is_file()
    # Only the model and its lock file remain: no half-written staging folders.
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [folders[0].name]


def _sdxl_image(folder: Path) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    return pipeline(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_sdxl_has_sdxl_structure_and_rebuilds_identically(tiny_model, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    folder = tiny_model("sdxl")
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    unet = pipeline.unet.config
    te1, te2 = pipeline.text_encoder.config, pipeline.text_encoder_2.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert unet.down_block_types[0] == "DownBlock2D"
    assert set(unet.down_block_types[1:]) == {"CrossAttnDownBlock2D"}
    assert isinstance(unet.transformer_layers_per_block, list)
    assert pipeline.vae.config.scaling_factor == 0.13025 and pipeline.vae.config.force_upcast
    scheduler = pipeline.scheduler.config
    betas = (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end)
    assert betas == ("scaled_linear", 0.00085, 0.012)
    assert (scheduler.num_train_timesteps, scheduler.prediction_type) == (1000, "epsilon")
    # The tokenizers were built locally and agree with the encoders they feed.
    ids = pipeline.tokenizer("a photo of a cat").input_ids
    assert ids[0] == te1.bos_token_id and ids[-1] == te1.eos_token_id
    assert max(pipeline.tokenizer_2("a dog!").input_ids) < te2.vocab_size

    image = _sdxl_image(folder)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    rebuilt = build_tiny("sdxl", root=tmp_path)
    np.testing.assert_array_equal(_sdxl_image(rebuilt), image)


def _conversation() -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    ]


def _qwen_logits(folder: Path) -> tuple[torch.Tensor, dict, object, object]:
    import transformers
    from transformers import AutoProcessor

    config = transformers.AutoConfig.from_pretrained(folder)
    model_class = getattr(transformers, config.architectures[0])
    model = model_class.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8))
    text = processor.apply_chat_template(_conversation(), tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits, inputs, processor, model


@pytest.mark.parametrize("name", list(QWEN_FAMILIES))
def test_qwen_vl_loads_runs_and_rebuilds_identically(name: str, tiny_model, tmp_path: Path) -> None:
    class_name, model_type = QWEN_FAMILIES[name]
    logits, inputs, processor, model = _qwen_logits(tiny_model(name))
    config, tokenizer = model.config, processor.tokenizer
    assert type(model).__name__ == class_name and config.model_type == model_type

    token_id = tokenizer.convert_tokens_to_ids
    assert config.image_token_id == token_id("<|image_pad|>")
    assert config.video_token_id == token_id("<|video_pad|>")
    assert config.vision_start_token_id == token_id("<|vision_start|>")
    assert config.vision_end_token_id == token_id("<|vision_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert config.text_config.vocab_size >= len(tokenizer)
    assert processor.video_processor is not None
    text = "Hello, world: 12 cats!"
    assert tokenizer.decode(tokenizer(text).input_ids) == text

    grid = inputs["image_grid_thw"]
    merge_size = processor.image_processor.merge_size
    assert inputs["pixel_values"].shape[0] == grid.prod()
    assert (inputs["input_ids"] == config.image_token_id).sum() == grid.prod() // merge_size**2
    assert logits.shape == (*inputs["input_ids"].shape, config.text_config.vocab_size)
    assert torch.isfinite(logits).all()

    rebuilt_logits, *_ = _qwen_logits(build_tiny(name, root=tmp_path))
    torch.testing.assert_close(rebuilt_logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(QWEN_FAMILIES))
def test_qwen_vl_chat_template_is_the_family_s_own(name: str, tiny_model) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model(name))
    text = processor.apply_chat_template(_conversation(), tokenize=False, add_generation_prompt=False)
    turns = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\nA red square.<|im_end|>\n"
    )
    # Qwen2-VL and Qwen2.5-VL add a default system prompt; Qwen3-VL does not.
    default_system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert text == (turns if name.startswith("qwen3-vl") else default_system + turns)
    prompt = processor.apply_chat_template(_conversation()[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
