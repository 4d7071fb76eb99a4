from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tuner.data.conversations import Conversation, load_conversations
from tuner.data.vl_encoding import (
    IGNORE_INDEX,
    SAMPLE_LENGTHS,
    collate_vl,
    collate_vl_packed,
    encode_conversation,
    packed_model_inputs,
    samples_in_batch,
    set_pixel_bounds,
    token_length,
)
from tuner.errors import ConfigError, ModelError

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
MAX_PIXELS = 96 * 96


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> list[Conversation]:
    root = tmp_path_factory.mktemp("vl-corpus")
    Image.new("RGB", (40, 30), (250, 10, 10)).save(root / "small.png")
    Image.new("RGB", (90, 130), (10, 250, 10)).save(root / "tall.png")
    Image.new("RGB", (400, 300), (10, 10, 250)).save(root / "large.png")
    records = [
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "<image>\nColour?"},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "And these: <image> <image>?"},
                {"role": "assistant", "content": "Green, then blue.\nBoth plain."},
            ],
            "images": ["small.png", "tall.png", "large.png"],
        },
        {
            "conversations": [
                {"from": "human", "value": "<image>What is it?"},
                {"from": "gpt", "value": " A blue square "},
            ],
            "image": "large.png",
        },
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "assistant", "content": "I start."}]},
    ]
    (root / "train.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    scan = load_conversations(root / "train.jsonl")
    assert scan.problems == []
    return scan.conversations


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def processor(family, tiny_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model(family))
    set_pixel_bounds(processor, min_pixels=28 * 28, max_pixels=MAX_PIXELS)
    return processor


def _replies(conversation: Conversation) -> str:
    return "".join(
        "".join(part["text"] for part in message["content"] if part["type"] == "text") + "<|im_end|>"
        for message in conversation.messages
        if message["role"] == "assistant"
    )


def _image_tokens(processor, sample) -> int:
    return int((sample.input_ids == processor.image_token_id).sum())


def test_labels_cover_exactly_the_replies_and_their_end_of_turn(processor, conversations) -> None:
    for conversation in conversations:
        sample = encode_conversation(processor, conversation)
        supervised = sample.labels != IGNORE_INDEX
        assert torch.equal(sample.labels[supervised], sample.input_ids[supervised])
        assert processor.tokenizer.decode(sample.labels[supervised]) == _replies(conversation)
        # The template's text around the replies (headers, newline after <|im_end|>) is not supervised.
        header_ids = processor.tokenizer("<|im_start|>assistant\n")["input_ids"]
        assert not supervised[: len(header_ids)].any()


def test_image_tokens_follow_the_bounded_image_grid(processor, conversations) -> None:
    merge = processor.image_processor.merge_size
    patch = processor.image_processor.patch_size
    for conversation in conversations:
        sample = encode_conversation(processor, conversation)
        if not conversation.images:
            assert sample.pixel_values is None and sample.image_grid_thw is None
            assert _image_tokens(processor, sample) == 0
            continue
        grid = sample.image_grid_thw
        assert len(grid) == len(conversation.images)
        assert _image_tokens(processor, sample) == int((grid.prod(dim=1) // merge**2).sum())
        assert sample.pixel_values.shape[0] == int(grid.prod(dim=1).sum())
        assert all(h * w * patch * patch <= MAX_PIXELS for _, h, w in grid.tolist())
        assert token_length(processor, conversation) == len(sample.input_ids)
    # The 400x300 image would be 12x(grid) larger without the bound: it is really shrunk.
    large = encode_conversation(processor, conversations[1]).image_grid_thw[0]
    set_pixel_bounds(processor, min_pixels=28 * 28, max_pixels=400 * 300)
    try:
        unbounded = encode_conversation(processor, conversations[1]).image_grid_thw[0]
    finally:
        set_pixel_bounds(processor, min_pixels=28 * 28, max_pixels=MAX_PIXELS)
    assert unbounded.prod() > 4 * large.prod()


def test_token_length_uses_the_upright_size_of_rotated_images(processor, tmp_path: Path) -> None:
    image = Image.new("RGB", (120, 40), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees: decoded upright it is 40 wide and 120 tall
    image.save(tmp_path / "rotated.jpg", exif=exif)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
    ]
    conversation = Conversation(messages, [tmp_path / "rotated.jpg"], "x:1")
    sample = encode_conversation(processor, conversation)
    _, height, width = sample.image_grid_thw[0].tolist()
    assert height > width
    assert token_length(processor, conversation) == len(sample.input_ids)


def test_overlong_samples_are_dropped_or_truncated_between_images(processor, conversations) -> None:
    conversation = conversations[0]
    full = encode_conversation(processor, conversation)
    assert encode_conversation(processor, conversation, max_length=len(full.input_ids)) is not None
    assert encode_conversation(processor, conversation, max_length=len(full.input_ids) - 1) is None

    tokenizer = processor.tokenizer
    starts = (full.input_ids == tokenizer.convert_tokens_to_ids("<|vision_start|>")).nonzero().flatten()
    ends = (full.input_ids == tokenizer.convert_tokens_to_ids("<|vision_end|>")).nonzero().flatten()
    first_reply = int((full.labels != IGNORE_INDEX).nonzero()[0])
    # Cuts inside the 2nd and 3rd image runs, just after the 3rd, and one before the first reply.
    for max_length in (int(starts[1]) + 2, int(ends[2]), int(ends[2]) + 1, first_reply):
        cut = encode_conversation(processor, conversation, max_length=max_length, overlength="truncate")
        if max_length <= first_reply:
            assert cut is None
            continue
        assert len(cut.input_ids) <= max_length
        assert torch.equal(cut.input_ids, full.input_ids[: len(cut.input_ids)])
        kept = int((cut.input_ids == tokenizer.convert_tokens_to_ids("<|vision_start|>")).sum())
        assert kept == int((cut.input_ids == tokenizer.convert_tokens_to_ids("<|vision_end|>")).sum())
        assert kept == len(cut.image_grid_thw)
        assert torch.equal(cut.image_grid_thw, full.image_grid_thw[:kept])
        merge = processor.image_processor.merge_size
        assert _image_tokens(processor, cut) == int((cut.image_grid_thw.prod(dim=1) // merge**2).sum())
        assert torch.equal(cut.pixel_values, full.pixel_values[: cut.pixel_values.shape[0]])
        assert cut.pixel_values.shape[0] == int(cut.image_grid_thw.prod(dim=1).sum())
        assert (cut.labels != IGNORE_INDEX).any()
        if max_length == int(starts[1]) + 2:
            assert len(cut.input_ids) == int(starts[1]) and kept == 1


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_pads_masks_and_concatenates_images(processor, conversations, padding_side) -> None:
    samples = [encode_conversation(processor, c) for c in conversations[:3]]
    pad = processor.tokenizer.pad_token_id
    batch = collate_vl(samples, pad_token_id=pad, padding_side=padding_side)
    longest = max(len(s.input_ids) for s in samples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    for row, sample in enumerate(samples):
        length = len(sample.input_ids)
        real = slice(0, length) if padding_side == "right" else slice(longest - length, longest)
        padding = slice(length, longest) if padding_side == "right" else slice(0, longest - length)
        assert torch.equal(batch["input_ids"][row, real], sample.input_ids)
        assert torch.equal(batch["labels"][row, real], sample.labels)
        assert batch["attention_mask"][row].sum() == length and batch["attention_mask"][row, real].all()
        assert (batch["input_ids"][row, padding] == pad).all()
        assert (batch["labels"][row, padding] == IGNORE_INDEX).all()
        assert (batch["mm_token_type_ids"][row] == 1).sum() == _image_tokens(processor, sample)
    assert torch.equal(batch["pixel_values"], torch.cat([samples[0].pixel_values, samples[1].pixel_values]))
    assert torch.equal(
        batch["image_grid_thw"], torch.cat([samples[0].image_grid_thw, samples[1].image_grid_thw])
    )
    text_only = collate_vl([samples[2]], pad_token_id=pad)
    assert "pixel_values" not in text_only and "image_grid_thw" not in text_only


def test_a_collated_batch_runs_through_the_tiny_model(tiny_model, family, processor, conversations) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model(family))
    samples = [encode_conversation(processor, c) for c in conversations[:3]]
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        right = model(**collate_vl(samples, pad, "right")).loss
        left = model(**collate_vl(samples, pad, "left")).loss
    assert torch.isfinite(right)
    # Padding must not change what the model sees: same loss whichever side is padded.
    torch.testing.assert_close(right, left)


def test_packed_collate_puts_samples_end_to_end_without_padding(processor, conversations) -> None:
    samples = [encode_conversation(processor, c) for c in conversations]
    batch = collate_vl_packed(samples)
    total = sum(len(s.input_ids) for s in samples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["mm_token_type_ids"].shape == (1, total)
    assert "attention_mask" not in batch and samples_in_batch(batch) == len(samples) == 4
    start = 0
    for sample in samples:
        end = start + len(sample.input_ids)
        assert torch.equal(batch["input_ids"][0, start:end], sample.input_ids)
        # No sample's first token is a target: the token before it belongs to another sample.
        assert batch["labels"][0, start] == IGNORE_INDEX
        assert torch.equal(batch["labels"][0, start + 1 : end], sample.labels[1:])
        start = end
    assert batch["sample_image_counts"] == (3, 1, 0, 0)
    assert torch.equal(
        batch["image_grid_thw"], torch.cat([samples[0].image_grid_thw, samples[1].image_grid_thw])
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_gives_each_sample_its_unpacked_logits_and_the_same_loss(
    tiny_model, family, processor, conversations, attention
) -> None:
    """The oracle is transformers itself on the padded batch: its positions, mask and loss."""
    from transformers import AutoModelForImageTextToText

    from tuner.models.qwenvl import rope_index_of

    model = AutoModelForImageTextToText.from_pretrained(tiny_model(family), attn_implementation=attention)
    samples = [encode_conversation(processor, c) for c in conversations]
    padded = collate_vl(samples, processor.tokenizer.pad_token_id, "right")
    packed = packed_model_inputs(collate_vl_packed(samples), rope_index_of(model))
    assert SAMPLE_LENGTHS not in packed and packed["position_ids"].shape[:2] == (4, 1)
    with torch.no_grad():
        padded_out = model(**padded)
        packed_out = model(**packed)
        # Control: the same row attended as one sequence mixes the samples.
        mixed = model(**{**packed, "attention_mask": torch.ones_like(packed["input_ids"])}).logits
    start = 0
    for row, sample in enumerate(samples):
        end = start + len(sample.input_ids)
        expected = padded_out.logits[row, : len(sample.input_ids)]
        torch.testing.assert_close(packed_out.logits[0, start:end], expected, atol=1e-4, rtol=1e-4)
        start = end
    torch.testing.assert_close(packed_out.loss, padded_out.loss, atol=1e-5, rtol=1e-5)
    last = samples[-1]
    assert not torch.allclose(mixed[0, -len(last.input_ids) :], padded_out.logits[-1, : len(last.input_ids)])


def test_a_template_that_rewrites_earlier_turns_is_refused(processor, conversations) -> None:
    original = processor.chat_template
    # Like a "thinking" template: only the last answer keeps its text, earlier ones are shortened.
    processor.chat_template = (
        "{% for m in messages %}{% set last = loop.last %}<|im_start|>{{ m.role }}\n"
        "{% for p in m.content %}{% if p.type == 'text' %}"
        "{{ p.text if (m.role != 'assistant' or last) else p.text[:1] }}"
        "{% else %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        encode_conversation(processor, conversations[2])  # one answer: nothing is rewritten
        with pytest.raises(ModelError, match="renders message"):
            encode_conversation(processor, conversations[0])
    finally:
        processor.chat_template = original


def test_pixel_bounds_must_be_a_range(processor) -> None:
    with pytest.raises(ConfigError, match="min_pixels"):
        set_pixel_bounds(processor, min_pixels=10_000, max_pixels=5_000)
