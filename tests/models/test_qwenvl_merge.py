"""Qwen-VL merge: same model without PEFT, processor kept, scale honoured, no half-written output.

The merge streams tensor by tensor; PEFT's `merge_and_unload` is the reference it must equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, PreTrainedModel

from tuner.data.vl_encoding import set_pixel_bounds
from tuner.errors import ConfigError, ModelError
from tuner.formats.safetensors_stream import SafetensorsStreamWriter
from tuner.models.qwenvl import (
    SUPPORTED_MODEL_TYPES,
    load_adapter_checked,
    load_qwenvl,
    lora_target_modules,
    save_adapter,
)
from tuner.models.qwenvl_merge import MERGE_RECORD_FILE, merge_qwenvl_adapter

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tuner_adapter.json")
# Pixel bounds set at training time, unlike the base model's, so a merge that took the base's processor shows.
TRAINING_MAX_PIXELS = 12544
CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
]


def make_adapter(tiny_model, name: str, folder, targets=("llm", "vision", "merger"), **lora):
    """A saved adapter with random (non-zero) LoRA weights; returns (folder, the in-memory PEFT model)."""
    model, processor, family = load_qwenvl(str(tiny_model(name)), dtype=torch.float32)
    torch.manual_seed(0)
    targets = lora_target_modules(model, family, targets)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **lora))
    with torch.no_grad():
        for parameter_name, parameter in peft_model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(std=0.2)
            elif "lora_magnitude_vector" in parameter_name:  # DoRA: magnitudes away from ||W||
                parameter.mul_(1.0 + 0.5 * torch.rand_like(parameter))
    set_pixel_bounds(processor, min_pixels=3136, max_pixels=TRAINING_MAX_PIXELS)
    save_adapter(peft_model, folder, processor, {"base_model": f"tiny-{name}", "family": family})
    return folder, peft_model.eval()


def prompt_inputs(processor) -> dict[str, torch.Tensor]:
    text = processor.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", (56, 84), (200, 40, 40))
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


@pytest.fixture(scope="module")
def qwen25_adapter(tiny_model, tmp_path_factory):
    return make_adapter(tiny_model, "qwen2.5-vl", tmp_path_factory.mktemp("adapter"))


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_merged_model_loads_without_peft_and_matches_base_plus_adapter(tiny_model, tmp_path, name):
    adapter_dir, peft_model = make_adapter(tiny_model, name, tmp_path / "adapter")
    merged_dir = merge_qwenvl_adapter(f"tiny-{name}", adapter_dir, tmp_path / "merged")

    assert not any((merged_dir / file).exists() for file in ADAPTER_FILES)
    config = json.loads((merged_dir / "config.json").read_text())
    merged = SUPPORTED_MODEL_TYPES[config["model_type"]].from_pretrained(str(merged_dir)).eval()
    assert not any("lora" in key for key in merged.state_dict())
    processor = AutoProcessor.from_pretrained(str(merged_dir))
    inputs = prompt_inputs(processor)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        merged_logits = merged(**inputs).logits
        # The adapter must matter, or equal logits would prove nothing.
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(**inputs).logits, expected, atol=1e-3)
        torch.testing.assert_close(merged_logits, expected, rtol=1e-4, atol=1e-4)
        greedy = {"max_new_tokens": 8, "do_sample": False}
        torch.testing.assert_close(
            merged.generate(**inputs, **greedy), peft_model.generate(**inputs, **greedy)
        )


def test_processor_and_chat_template_survive_the_merge(tiny_model, tmp_path, qwen25_adapter):
    adapter_dir, _ = qwen25_adapter
    merged_dir = merge_qwenvl_adapter("tiny-qwen2.5-vl", adapter_dir, tmp_path / "merged")

    training_processor = AutoProcessor.from_pretrained(str(adapter_dir))
    merged_processor = AutoProcessor.from_pretrained(str(merged_dir))
    for add_generation_prompt in (False, True):
        rendered = [
            p.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt)
            for p in (training_processor, merged_processor)
        ]
        assert rendered[0] == rendered[1]
    assert merged_processor.image_processor.size["longest_edge"] == TRAINING_MAX_PIXELS
    assert merged_processor.video_processor is not None
    assert (merged_dir / "generation_config.json").is_file()
    record = json.loads((merged_dir / MERGE_RECORD_FILE).read_text())
    assert record["base_model"] == "tiny-qwen2.5-vl" and record["scale"] == 1.0


def test_scale_half_merges_half_the_delta(tiny_model, tmp_path, qwen25_adapter):
    adapter_dir, _ = qwen25_adapter
    base = load_file(str(tiny_model("qwen2.5-vl") / "model.safetensors"))
    full = load_file(
        str(merge_qwenvl_adapter("tiny-qwen2.5-vl", adapter_dir, tmp_path / "full") / "model.safetensors")
    )
    half = load_file(
        str(
            merge_qwenvl_adapter("tiny-qwen2.5-vl", adapter_dir, tmp_path / "half", scale=0.5)
            / "model.safetensors"
        )
    )

    changed = [key for key in base if not torch.equal(full[key], base[key])]
    # Saved in the original Qwen checkpoint layout (`model.layers.N`, `visual.merger`) serving stacks read.
    assert any(key.startswith("model.layers.") for key in changed)
    assert any(key.startswith("visual.merger.") for key in changed)
    for key in base:
        torch.testing.assert_close(half[key] - base[key], 0.5 * (full[key] - base[key]), rtol=1e-4, atol=1e-6)


def test_dtype_casts_the_merged_weights_and_overwrite_replaces(tiny_model, tmp_path, qwen25_adapter):
    adapter_dir, _ = qwen25_adapter
    output = tmp_path / "merged"
    output.mkdir()
    (output / "old.txt").write_text("previous merge")
    with pytest.raises(ConfigError, match="already exists"):
        merge_qwenvl_adapter("tiny-qwen2.5-vl", adapter_dir, output)
    assert (output / "old.txt").is_file()

    merge_qwenvl_adapter("tiny-qwen2.5-vl", adapter_dir, output, dtype="bf16", overwrite=True)
    assert not (output / "old.txt").exists()
    assert {t.dtype for t in load_file(str(output / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_adapter_of_another_family_is_refused_before_writing(tiny_model, tmp_path):
    adapter_dir, _ = make_adapter(tiny_model, "qwen2-vl", tmp_path / "adapter", targets=("llm",))
    output = tmp_path / "out" / "merged"
    with pytest.raises(ModelError, match="qwen2_vl") as refused:
        merge_qwenvl_adapter("tiny-qwen2.5-vl", adapter_dir, output)
    assert "tiny-qwen2-vl" in refused.value.hint
    assert not output.parent.exists()


def test_interrupted_merge_leaves_no_output_folder(tmp_path, qwen25_adapter, monkeypatch):
    adapter_dir, _ = qwen25_adapter

    def write_half_then_fail(self, name, tensor):
        self.path.write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(SafetensorsStreamWriter, "add", write_half_then_fail)
    output = tmp_path / "merges" / "merged"
    with pytest.raises(OSError, match="No space"):
        merge_qwenvl_adapter("tiny-qwen2.5-vl", adapter_dir, output)
    assert list(output.parent.iterdir()) == []


def _peft_merged_state(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The reference: PEFT's merge_and_unload in fp32, named as transformers names the parameters."""
    model, _, _ = load_qwenvl(str(base_dir), dtype=torch.float32)
    return load_adapter_checked(model, adapter_dir).merge_and_unload().state_dict()


def _loaded_state(folder: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_qwenvl(str(folder), dtype=torch.float32)
    return model.state_dict()


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_streamed_merge_equals_peft_merge_and_unload(tiny_model, tmp_path, name):
    # rank_pattern, alpha_pattern and rsLoRA change alpha/r per module: the streamed delta must follow PEFT.
    adapter_dir, _ = make_adapter(
        tiny_model,
        name,
        tmp_path / "adapter",
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3.0},
    )
    merged_dir = merge_qwenvl_adapter(f"tiny-{name}", adapter_dir, tmp_path / "merged", dtype="fp32")

    expected = _peft_merged_state(tiny_model(name), adapter_dir)
    merged = _loaded_state(merged_dir)
    base = _loaded_state(tiny_model(name))
    assert merged.keys() == expected.keys()
    changed = [key for key in expected if not torch.equal(expected[key], base[key])]
    assert any(".q_proj." in key for key in changed) and any(".v_proj." in key for key in changed)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_sharded_base_keeps_its_shards_and_index(tiny_model, tmp_path, qwen25_adapter):
    adapter_dir, _ = qwen25_adapter
    sharded = tmp_path / "sharded-base"
    model, processor, _ = load_qwenvl(str(tiny_model("qwen2.5-vl")), dtype=torch.float32)
    model.save_pretrained(str(sharded), max_shard_size="100KB")
    processor.save_pretrained(str(sharded))
    base_index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(base_index["weight_map"].values())) > 1

    merged_dir = merge_qwenvl_adapter(str(sharded), adapter_dir, tmp_path / "merged", dtype="bf16")

    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    stored = {}
    for shard in set(index["weight_map"].values()):
        stored |= load_file(str(merged_dir / shard))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    expected = _peft_merged_state(sharded, adapter_dir)
    for key, value in _loaded_state(merged_dir).items():
        torch.testing.assert_close(value, expected[key].to(torch.bfloat16).float(), msg=key)


def test_dora_merge_equals_the_unmerged_dora_model(tiny_model, tmp_path):
    adapter_dir, peft_model = make_adapter(
        tiny_model, "qwen2.5-vl", tmp_path / "dora", targets=("llm", "merger"), use_dora=True
    )
    merged_dir = merge_qwenvl_adapter("tiny-qwen2.5-vl", adapter_dir, tmp_path / "merged", dtype="fp32")

    merged = SUPPORTED_MODEL_TYPES["qwen2_5_vl"].from_pretrained(str(merged_dir)).eval()
    inputs = prompt_inputs(AutoProcessor.from_pretrained(str(merged_dir)))
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        # The magnitudes must matter: the same LoRA without them is another model.
        for module in peft_model.modules():
            if hasattr(module, "lora_variant"):
                module.lora_variant.pop("default", None)  # peft 0.21: no variant = vanilla LoRA
        assert not torch.allclose(peft_model(**inputs).logits, expected, atol=1e-3)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


def test_lora_that_fits_no_weight_is_refused_before_writing(tiny_model, tmp_path):
    output = tmp_path / "out" / "merged"
    adapter_dir, _ = make_adapter(tiny_model, "qwen2.5-vl", tmp_path / "adapter", targets=("llm",))
    weights_file = adapter_dir / "adapter_model.safetensors"
    weights = load_file(str(weights_file))
    key = next(key for key in weights if key.endswith("q_proj.lora_A.weight"))
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1)
    save_file(weights, str(weights_file))
    with pytest.raises(ModelError, match="q_proj") as refused:
        merge_qwenvl_adapter("tiny-qwen2.5-vl", adapter_dir, output)
    assert "does not fit" in refused.value.message
    assert not output.parent.exists()


def test_lora_merge_streams_without_loading_the_model(tiny_model, tmp_path, qwen25_adapter, monkeypatch):
    # Loading the whole model is what made 7B merges need ~33 GB (fp32); the merge never does.
    def refuse(*args, **kwargs):
        raise AssertionError("the merge loaded the whole model")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    adapter_dir, _ = qwen25_adapter
    merged_dir = merge_qwenvl_adapter("tiny-qwen2.5-vl", adapter_dir, tmp_path / "merged")
    assert (merged_dir / "model.safetensors").is_file()
