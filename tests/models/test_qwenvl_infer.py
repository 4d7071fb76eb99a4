"""`tuner infer qwenvl`: the greedy answer of base + adapter, --data answers per sample, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_runner import run_cli
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from tuner.errors import ConfigError, ModelError
from tuner.models.qwenvl import add_lora, load_qwenvl, lora_target_modules, save_adapter
from tuner.models.qwenvl_infer import (
    check_adapter_shapes,
    generate_answer,
    load_answerer,
    prompt_messages,
)
from tuner.runtime import resolve_runtime

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """A saved Qwen2.5-VL adapter with random non-zero weights, and the in-memory model and processor."""
    model, processor, family = load_qwenvl(str(tiny_model("qwen2.5-vl")), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = add_lora(model, lora_target_modules(model, family, ("llm",)), rank=4, alpha=8)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter(peft_model, folder, processor, {"base_model": "tiny-qwen2.5-vl", "family": family})
    return folder, peft_model.eval(), processor


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, colour in enumerate([(220, 30, 30), (30, 60, 220)]):
        path = folder / f"{index}.png"
        Image.new("RGB", (56, 84), colour).save(path)
        paths.append(path)
    return paths


def reference_answer(peft_model, processor, messages: list[dict], image_paths) -> str:
    """Greedy answer built here straight from transformers, independent of tuner's inference code."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pictures = [Image.open(path).convert("RGB") for path in image_paths]
    inputs = processor(text=[text], images=pictures or None, return_tensors="pt")
    with torch.no_grad():
        generated = peft_model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    text = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    # tuner decodes whole characters only: the U+FFFD transformers writes for bytes that form no character
    # is dropped (tuner/models/decoding.py).
    return text.replace("\ufffd", "")


def test_infer_prints_the_greedy_answer_of_base_plus_adapter(capsys, adapter, images):
    adapter_dir, peft_model, processor = adapter
    question = "What is in the picture?"
    expected = reference_answer(peft_model, processor, prompt_messages(question, 1), images[:1])
    with peft_model.disable_adapter():
        base_answer = reference_answer(peft_model, processor, prompt_messages(question, 1), images[:1])
    assert expected != base_answer  # otherwise the adapter could be silently ignored

    code, out, err = run_cli(
        capsys,
        *("infer", "qwenvl", "--model", "tiny-qwen2.5-vl", "--adapter", str(adapter_dir)),
        *("--image", str(images[0]), "--prompt", question, "--device", "cpu"),
        *("--max-new-tokens", str(MAX_NEW_TOKENS)),
    )
    assert code == 0, err
    assert out == expected + "\n"


def test_infer_data_answers_each_sample_from_its_conversation_so_far(capsys, tmp_path, adapter, images):
    adapter_dir, peft_model, processor = adapter
    shutil.copy(images[0], tmp_path / "red.png")
    shutil.copy(images[1], tmp_path / "blue.png")
    records = [
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "<image>What colour is this?"},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "And the shape?"},
                {"role": "assistant", "content": "Square."},
            ],
            "images": ["red.png"],
        },
        {
            "conversations": [
                {"from": "human", "value": "<image>Describe it."},
                {"from": "gpt", "value": "Blue."},
            ],
            "image": "blue.png",
        },
    ]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    out = tmp_path / "answers" / "before_after.jsonl"

    # No --model: the base comes from the adapter's tuner_adapter.json.
    code, stdout, err = run_cli(
        capsys,
        *("infer", "qwenvl", "--adapter", str(adapter_dir), "--data", str(data), "--out", str(out)),
        *("--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS)),
    )
    assert code == 0, err
    assert f"wrote 2 answers to {out}" in stdout
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(a["question"], a["reference"]) for a in answers] == [
        ("And the shape?", "Square."),
        ("Describe it.", "Blue."),
    ]
    first_prompt = [
        {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the shape?"}]},
    ]
    assert answers[0]["answer"] == reference_answer(peft_model, processor, first_prompt, images[:1])


def test_prompt_and_data_together_are_refused(capsys, adapter, tmp_path):
    code, _, err = run_cli(
        capsys, "infer", "qwenvl", "--model", "tiny", "--prompt", "Hi?", "--data", str(tmp_path / "x.jsonl")
    )
    assert code == 2 and "either --prompt or --data" in err


def test_max_pixels_bounds_the_images_and_negative_temperature_is_refused(adapter, images):
    adapter_dir, _, _ = adapter
    answerer = load_answerer("tiny-qwen2.5-vl", resolve_runtime("cpu"), adapter_dir, max_pixels=56 * 56)
    inputs = answerer.processor(text=["<|image_pad|>"], images=[Image.open(images[0])], return_tensors="pt")
    assert int(inputs["image_grid_thw"].prod()) * 14 * 14 <= 56 * 56  # 56x84 would need 4x6 patches
    with pytest.raises(ConfigError, match="temperature"):
        generate_answer(answerer, prompt_messages("Hi?", 0), temperature=-0.5)


def test_adapter_recorded_for_another_family_is_refused(adapter, tmp_path):
    adapter_dir, _, _ = adapter
    foreign = shutil.copytree(adapter_dir, tmp_path / "adapter")
    record = json.loads((foreign / "tuner_adapter.json").read_text())
    (foreign / "tuner_adapter.json").write_text(json.dumps({**record, "family": "qwen3_vl"}))
    with pytest.raises(ModelError, match=r"qwen3_vl model .* is a qwen2_5_vl model"):
        load_answerer("tiny-qwen2.5-vl", resolve_runtime("cpu"), foreign)


def test_adapter_of_another_model_size_is_refused_naming_the_layer(tiny_model, adapter):
    adapter_dir, _, _ = adapter
    config = Qwen2_5_VLConfig.from_pretrained(str(tiny_model("qwen2.5-vl")))
    config.text_config.intermediate_size = 96
    wider = Qwen2_5_VLForConditionalGeneration(config)
    with pytest.raises(ModelError, match=r"mlp\.(gate|up|down)_proj.* 64 -> 96|mlp\.down_proj.* 96 -> 64"):
        check_adapter_shapes(wider, adapter_dir)
