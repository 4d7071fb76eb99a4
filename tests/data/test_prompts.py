"""The one record -> (prompt inputs, reference) builder: its inputs are the processor's own, and a model
that answers exactly what it trained on scores 1 against its reference, boxes and reasoning included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tuner.data.conversations import load_conversations
from tuner.data.grounding import Box, box_style, model_coordinates, resized_size
from tuner.data.prompts import build_prompt, model_inputs, scored_answer
from tuner.data.thinking import TrainingSamples
from tuner.data.vl_encoding import IGNORE_INDEX, encode_conversation
from tuner.eval.metrics import parse_boxes, score_answer

SIZE = (120, 90)
REASONING_BOX = Box(5, 5, 30, 25, "cat")
ANSWER_BOX = Box(60, 40, 110, 85, "cat")


def _processor(tiny_model, family: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_model(family)))


def _write(folder: Path, record: dict) -> Path:
    Image.new("RGB", SIZE, (240, 240, 240)).save(folder / "scene.png")
    Image.new("RGB", (56, 84), (200, 30, 30)).save(folder / "red.png")
    path = folder / "data.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return path


def _conversation(folder: Path, record: dict):
    scan = load_conversations(_write(folder, record))
    assert not scan.problems, scan.problems
    return scan.conversations[0]


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_inputs_equal_the_processors_own_chat_template(tiny_model, tmp_path, family) -> None:
    processor = _processor(tiny_model, family)
    record = {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "<image>What colour?"},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "And this one? <image>"},
            {"role": "assistant", "content": "Grey."},
        ],
        "images": ["red.png", "scene.png"],
    }
    prompt = build_prompt(processor, _conversation(tmp_path, record))
    assert prompt.reference == "Grey." and prompt.question == "And this one? "
    ours = model_inputs(processor, [prompt])
    # The same turns with the images inline, loaded and rendered by transformers itself.
    paths = iter([str(tmp_path / "red.png"), str(tmp_path / "scene.png")])
    inline = [
        {
            "role": m["role"],
            "content": [
                {"type": "image", "path": next(paths)} if p["type"] == "image" else p for p in m["content"]
            ],
        }
        for m in prompt.messages
    ]
    theirs = processor.apply_chat_template(
        inline, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    assert torch.allclose(ours["pixel_values"], theirs["pixel_values"])


def _grounded_reasoning_record() -> dict:
    """A reply whose reasoning points at one box and whose answer points at another."""
    return {
        "messages": [
            {"role": "user", "content": "<image>Where is the cat?"},
            {"role": "assistant", "content": "<think>Not at <box>, that is a shadow.</think>The cat: <box>"},
        ],
        "images": ["scene.png"],
        "boxes": [
            {
                "bbox": [REASONING_BOX.x1, REASONING_BOX.y1, REASONING_BOX.x2, REASONING_BOX.y2],
                "label": "cat",
            },
            {"bbox": [ANSWER_BOX.x1, ANSWER_BOX.y1, ANSWER_BOX.x2, ANSWER_BOX.y2], "label": "cat"},
        ],
    }


def _trained_answer(processor, sample) -> str:
    """What the sample supervises for its last reply, decoded as answers are: a perfect answer."""
    encoded = encode_conversation(processor, sample)
    supervised = encoded.input_ids[encoded.labels != IGNORE_INDEX]
    if sample.supervised_replies == "all":  # the last reply's tokens: after the last header
        header = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        ids = encoded.input_ids.tolist()
        start = max(i for i in range(len(ids)) if ids[i : i + len(header)] == header) + len(header)
        supervised = encoded.input_ids[start:][encoded.labels[start:] != IGNORE_INDEX]
    return processor.decode(supervised, skip_special_tokens=True)


@pytest.mark.parametrize("policy", ["keep", "strip", "empty"])
@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-thinking"])
def test_a_perfect_answer_scores_one_with_the_answers_own_box(tiny_model, tmp_path, family, policy) -> None:
    processor = _processor(tiny_model, family)
    conversation = _conversation(tmp_path, _grounded_reasoning_record())
    sample = TrainingSamples.build(processor, [conversation], policy)[-1]
    prompt = build_prompt(processor, conversation, policy)
    # The reference is the final answer, with the answer's box (not the reasoning's), as answers read.
    assert "<think>" not in prompt.reference and "shadow" not in prompt.reference
    style = box_style(processor)
    wanted = model_coordinates(ANSWER_BOX, style, SIZE, resized_size(processor, *SIZE))
    assert parse_boxes(prompt.reference) == [tuple(float(v) for v in wanted)]
    perfect = _trained_answer(processor, sample)
    scores = score_answer(scored_answer(perfect, prompt), [prompt.reference], ["normalised_match", "box_iou"])
    assert scores == {"normalised_match": 1.0, "box_iou": 1.0}
    # The automatic metrics of a box reference are the box metrics.
    assert set(score_answer(scored_answer(perfect, prompt), [prompt.reference])) == {
        "box_accuracy",
        "box_iou",
    }


def test_an_answer_still_reasoning_scores_as_no_answer(tiny_model, tmp_path) -> None:
    record = {
        "messages": [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}],
    }
    conversation = _conversation(tmp_path, record)
    thinking = build_prompt(_processor(tiny_model, "qwen3-vl-thinking"), conversation)
    instruct = build_prompt(_processor(tiny_model, "qwen3-vl"), conversation)
    assert thinking.opens_reasoning and not instruct.opens_reasoning
    assert scored_answer("Red is what I", thinking) == ""  # ran out of tokens before </think>
    assert scored_answer("hmm\n</think>\n\nRed.", thinking) == "Red."
    assert scored_answer("Red.", instruct) == "Red."
    assert scored_answer("<think>\nhmm\n</think>\n\nRed.", instruct) == "Red."
