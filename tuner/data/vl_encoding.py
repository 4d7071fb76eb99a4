"""Turn a Conversation into model inputs for Qwen2-VL / Qwen2.5-VL / Qwen3-VL: tokens, labels, pixels.

The text comes from the processor's own chat template and the tokens from the processor, so each
image becomes `<|vision_start|>` + one `<|image_pad|>` per merged patch + `<|vision_end|>`, exactly
as at inference.

**Labels.** Loss is on the assistant replies only: the reply text and the `<|im_end|>` that closes
it, because producing `<|im_end|>` is how the model learns to stop. The newline the Qwen templates
write after `<|im_end|>` is not supervised: generation stops at `<|im_end|>`, so that newline is
never predicted at inference. Everything else (system, user turns, images, the
`<|im_start|>assistant\\n` header) is -100.

The reply spans come from the template, not from searching the text for the reply: the template is
rendered for `messages[:i]` and `messages[:i + 1]`, the i-th assistant message's span is what the
second rendering added, minus the assistant header (what `add_generation_prompt=True` appends).
This needs each rendering to be a prefix of the next one; a template that rewrites earlier turns
(Qwen3 "thinking" templates drop the `<think>` blocks of past turns) breaks that and is refused
with an error rather than trained with shifted masks.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image

from tuner.data.conversations import Conversation
from tuner.data.images import DEFAULT_MAX_PIXELS, load_image_rgb
from tuner.errors import ConfigError, DataError, ModelError

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
# EXIF orientations that rotate by 90 degrees: the decoded (upright) image has width and height swapped.
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_HEADER_PROBE = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
# Keys of a packed batch that say where its samples lie; `packed_model_inputs` turns them into
# position ids and removes them before the batch reaches the model.
SAMPLE_LENGTHS = "sample_lengths"
SAMPLE_IMAGE_COUNTS = "sample_image_counts"


@dataclass
class EncodedSample:
    """One conversation as model inputs; `labels` is -100 where no loss is taken."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    source: str
    # 1 on image tokens: transformers 5.23's Qwen-VL models need it to place images in M-RoPE.
    mm_token_type_ids: torch.Tensor | None = None


def set_pixel_bounds(processor, min_pixels: int, max_pixels: int) -> None:
    """Bound the pixels of each image (and video frame) the processor resizes to.

    transformers 5.23 resizes and counts image tokens from `size` (`shortest_edge` is the minimum
    pixel count, `longest_edge` the maximum). It also still reads `min_pixels` / `max_pixels`
    attributes: when set they override `size` on every call through a deprecated path that warns
    each time, so they are cleared and `size` holds the bounds alone.
    """
    if not 0 < min_pixels <= max_pixels:
        raise ConfigError(
            f"data.min_pixels={min_pixels} and data.max_pixels={max_pixels} are not a valid range",
            hint="use 0 < data.min_pixels <= data.max_pixels (e.g. 3136 and 589824)",
        )
    for component in (processor.image_processor, getattr(processor, "video_processor", None)):
        if component is None:
            continue
        size = component.size
        bounds = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        component.size = {**size, **bounds} if isinstance(size, dict) else type(size)(**bounds)
        component.min_pixels = None
        component.max_pixels = None


def encode_conversation(
    processor,
    conversation: Conversation,
    max_length: int | None = None,
    overlength: Literal["drop", "truncate"] = "drop",
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> EncodedSample | None:
    """Tokens, labels and pixels of `conversation`; None when it is too long and cannot be used.

    Longer than `max_length` tokens: `drop` returns None; `truncate` cuts at `max_length`, moving the
    cut back to before an image whose tokens it would split (that image's pixels go too), and returns
    None when no supervised token is left. `background` fills transparent pixels; images with more
    than `max_image_pixels` pixels are refused (`data.background`, `data.max_image_pixels`).
    """
    if overlength not in ("drop", "truncate"):
        raise ConfigError(
            f"data.overlength={overlength!r} is not 'drop' or 'truncate'",
            hint="set data.overlength to drop (skip long samples) or truncate",
        )
    text, reply_spans = render_with_reply_spans(processor, conversation)
    images = [load_image_rgb(path, background, max_image_pixels) for path in conversation.images]
    encoded = processor(
        text=[text],
        images=images or None,
        return_offsets_mapping=True,
        return_text_replacement_offsets=True,
    )
    input_ids = torch.tensor(encoded["input_ids"][0], dtype=torch.long)
    labels = _labels(
        input_ids, encoded["offset_mapping"][0], encoded["text_replacement_offsets"][0], reply_spans
    )
    mm_token_type_ids = encoded.get("mm_token_type_ids")
    if mm_token_type_ids is not None:
        mm_token_type_ids = torch.tensor(mm_token_type_ids[0], dtype=torch.long)
    sample = EncodedSample(
        input_ids=input_ids,
        labels=labels,
        pixel_values=torch.as_tensor(encoded["pixel_values"]) if images else None,
        image_grid_thw=torch.as_tensor(encoded["image_grid_thw"], dtype=torch.long) if images else None,
        source=conversation.source,
        mm_token_type_ids=mm_token_type_ids,
    )
    if max_length is None or len(input_ids) <= max_length:
        return sample
    if overlength == "drop":
        return None
    return _truncated(processor, sample, max_length)


def render_with_reply_spans(processor, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text of the conversation and the `(start, end)` characters of each reply."""
    messages = conversation.messages
    prompt = processor.apply_chat_template(_HEADER_PROBE, tokenize=False)
    with_header = processor.apply_chat_template(_HEADER_PROBE, tokenize=False, add_generation_prompt=True)
    header = with_header[len(prompt) :]
    if not with_header.startswith(prompt) or not header:
        raise ModelError(
            "the processor's chat template has no assistant header for add_generation_prompt=True",
            hint="use the model's original chat template (chat_template.jinja in its folder)",
        )
    rendered = ""
    reply_spans = []
    for count in range(1, len(messages) + 1):
        longer = processor.apply_chat_template(messages[:count], tokenize=False)
        if not longer.startswith(rendered):
            raise ModelError(
                f"{conversation.source}: the chat template renders message {count - 1} differently once "
                f"message {count} follows it, so the answer tokens cannot be located",
                hint="templates that rewrite earlier turns (such as dropping past <think> blocks) cannot be "
                "trained on; use the model's instruct template or remove those blocks from the data",
            )
        if messages[count - 1]["role"] == "assistant":
            reply_spans.append(_reply_span(rendered, longer, header, conversation.source, count))
        rendered = longer
    return rendered, reply_spans


def _reply_span(before: str, after: str, header: str, source: str, number: int) -> tuple[int, int]:
    added = after[len(before) :]
    # Scaffolding may come before the header: Qwen2-VL's template inserts its default system prompt
    # when a conversation opens with an assistant turn.
    header_at = added.find(header)
    reply = added[header_at + len(header) :].rstrip()
    if header_at < 0 or not reply.endswith(END_OF_TURN):
        raise ModelError(
            f"{source}: the chat template does not render assistant message {number} as "
            f"{header!r} + reply + {END_OF_TURN!r}",
            hint="use the Qwen-VL model's original chat template",
        )
    start = len(before) + header_at + len(header)
    return start, start + len(reply)


def _labels(
    input_ids: torch.Tensor,
    offsets: list[tuple[int, int]],
    replacements: list[dict],
    reply_spans: list[tuple[int, int]],
) -> torch.Tensor:
    """Copy the ids of the tokens inside a reply span into the labels; -100 elsewhere."""
    # Offsets refer to the text after each <|image_pad|> was repeated once per image token, so spans
    # are shifted by the characters the expansions before them added.
    placeholder_ends = [replacement["span"][1] for replacement in replacements]
    chars_gained = [0]
    for replacement in replacements:
        chars_gained.append(replacement["new_span"][1] - replacement["span"][1])
    token_starts = torch.tensor([start for start, _ in offsets])
    token_ends = torch.tensor([end for _, end in offsets])
    supervised = torch.zeros(len(offsets), dtype=torch.bool)
    for start, end in reply_spans:
        shift = chars_gained[bisect.bisect_right(placeholder_ends, start)]
        supervised |= (token_starts < end + shift) & (token_ends > start + shift)
    return torch.where(supervised, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def _truncated(processor, sample: EncodedSample, max_length: int) -> EncodedSample | None:
    tokenizer = processor.tokenizer
    starts = (sample.input_ids == tokenizer.convert_tokens_to_ids(VISION_START)).nonzero().flatten().tolist()
    ends = (sample.input_ids == tokenizer.convert_tokens_to_ids(VISION_END)).nonzero().flatten().tolist()
    cut = max_length
    kept_images = 0
    for start, end in zip(starts, ends, strict=True):
        if end < cut:
            kept_images += 1
        else:
            cut = min(cut, start)
            break
    labels = sample.labels[:cut]
    if not (labels != IGNORE_INDEX).any():
        return None
    pixel_values = image_grid_thw = None
    if kept_images:
        image_grid_thw = sample.image_grid_thw[:kept_images]
        pixel_values = sample.pixel_values[: int(image_grid_thw.prod(dim=1).sum())]
    return EncodedSample(
        input_ids=sample.input_ids[:cut],
        labels=labels,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        source=sample.source,
        mm_token_type_ids=None if sample.mm_token_type_ids is None else sample.mm_token_type_ids[:cut],
    )


def collate_vl(
    samples: list[EncodedSample], pad_token_id: int, padding_side: Literal["right", "left"] = "right"
) -> dict[str, torch.Tensor]:
    """Pad a batch: `input_ids`, `attention_mask`, `labels` (-100 on padding), `mm_token_type_ids`,
    and, when any sample has images, `pixel_values` and `image_grid_thw` concatenated in sample order."""
    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding side {padding_side!r} is not 'right' or 'left'")
    longest = max(len(sample.input_ids) for sample in samples)

    def padded(rows: list[torch.Tensor], value: int) -> torch.Tensor:
        batch = torch.full((len(rows), longest), value, dtype=torch.long)
        for index, row in enumerate(rows):
            if padding_side == "right":
                batch[index, : len(row)] = row
            else:
                batch[index, longest - len(row) :] = row
        return batch

    batch = {
        "input_ids": padded([s.input_ids for s in samples], pad_token_id),
        "attention_mask": padded([torch.ones_like(s.input_ids) for s in samples], 0),
        "labels": padded([s.labels for s in samples], IGNORE_INDEX),
    }
    if any(s.mm_token_type_ids is not None for s in samples):
        batch["mm_token_type_ids"] = padded([_token_types(s) for s in samples], 0)
    return batch | _images_of(samples)


def collate_vl_packed(samples: list[EncodedSample]) -> dict[str, torch.Tensor | tuple[int, ...]]:
    """The batch's samples end to end in one row, with no padding (`data.packing`).

    Besides the model inputs (`input_ids`, `labels`, `mm_token_type_ids`, `pixel_values`,
    `image_grid_thw`) it records each sample's token and image count, from which
    `packed_model_inputs` builds per-sample position ids. There is no `attention_mask`: transformers
    reads the sample boundaries from the text position ids restarting at 0 and keeps attention
    inside each sample (a block-diagonal causal mask for eager/SDPA, variable-length kernels for
    flash attention).
    """
    labels = []
    for sample in samples:
        sample_labels = sample.labels.clone()
        # The shifted loss would otherwise ask the last token of one sample to predict the first
        # token of the next one.
        sample_labels[0] = IGNORE_INDEX
        labels.append(sample_labels)
    batch = {
        "input_ids": torch.cat([s.input_ids for s in samples])[None],
        "labels": torch.cat(labels)[None],
        # Plain ints, not tensors: they stay on the host when the batch moves to the device, so reading
        # them costs no device synchronisation.
        SAMPLE_LENGTHS: tuple(len(s.input_ids) for s in samples),
        SAMPLE_IMAGE_COUNTS: tuple(0 if s.image_grid_thw is None else len(s.image_grid_thw) for s in samples),
    }
    if any(s.mm_token_type_ids is not None for s in samples):
        batch["mm_token_type_ids"] = torch.cat([_token_types(s) for s in samples])[None]
    return batch | _images_of(samples)


def _token_types(sample: EncodedSample) -> torch.Tensor:
    """The sample's modality per token (0 text, 1 image); all text when the processor gave none."""
    if sample.mm_token_type_ids is not None:
        return sample.mm_token_type_ids
    return torch.zeros_like(sample.input_ids)


def _images_of(samples: list[EncodedSample]) -> dict[str, torch.Tensor]:
    """`pixel_values` and `image_grid_thw` of every image, in sample order; empty without images."""
    with_images = [s for s in samples if s.pixel_values is not None]
    if not with_images:
        return {}
    return {
        "pixel_values": torch.cat([s.pixel_values for s in with_images]),
        "image_grid_thw": torch.cat([s.image_grid_thw for s in with_images]),
    }


RopeIndex = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def packed_model_inputs(batch: dict, rope_index: RopeIndex) -> dict:
    """The model inputs of a packed batch: its sample records replaced by `position_ids` (4, 1, length).

    Row 0 holds the text positions (0, 1, ... restarting with every sample): transformers' Qwen-VL
    language models take a 4-row `position_ids` as text positions plus M-RoPE positions and build the
    packed attention from row 0. Rows 1-3 are each sample's M-RoPE positions, computed by the model's own
    `get_rope_index` (`rope_index`) on that sample alone, so they equal those of the unpacked sample.
    `use_cache` is off: transformers reads packing from the positions only when there is no KV cache, and
    with one it would let the samples attend to each other.
    """
    inputs = {key: value for key, value in batch.items() if key not in (SAMPLE_LENGTHS, SAMPLE_IMAGE_COUNTS)}
    input_ids = batch["input_ids"]
    token_types = batch.get("mm_token_type_ids")
    grids = batch.get("image_grid_thw")
    segments = []
    start = first_image = 0
    for length, images in zip(batch[SAMPLE_LENGTHS], batch[SAMPLE_IMAGE_COUNTS], strict=True):
        end = start + length
        text_positions = torch.arange(length, device=input_ids.device).view(1, 1, -1)
        if images:
            if token_types is None:
                raise ModelError(
                    "a packed batch with images has no mm_token_type_ids to place them in M-RoPE",
                    hint="set data.packing: false, or update transformers",
                )
            rope_positions, _ = rope_index(
                input_ids[:, start:end],
                mm_token_type_ids=token_types[:, start:end],
                image_grid_thw=grids[first_image : first_image + images],
            )
        else:
            rope_positions = text_positions.expand(3, 1, -1)
        segments.append(torch.cat([text_positions, rope_positions.to(text_positions.dtype)]))
        start, first_image = end, first_image + images
    inputs["position_ids"] = torch.cat(segments, dim=2)
    inputs["use_cache"] = False
    return inputs


def samples_in_batch(batch: dict) -> int:
    """How many samples a padded or packed batch holds."""
    if SAMPLE_LENGTHS in batch:
        return len(batch[SAMPLE_LENGTHS])
    return batch["input_ids"].shape[0]


def token_length(processor, conversation: Conversation) -> int:
    """The exact number of tokens `encode_conversation` produces, without decoding any image.

    Image token counts come from the image size in the file header and the processor's own resize
    rule (the current pixel bounds included).
    """
    text = processor.apply_chat_template(conversation.messages, tokenize=False)
    length = len(processor.tokenizer(text)["input_ids"])
    image_processor = processor.image_processor
    for path in conversation.images:
        height, width = _upright_size(path)
        patches = image_processor.get_number_of_image_patches(height, width, {})
        # Each image is already one <|image_pad|> in the rendered text.
        length += patches // image_processor.merge_size**2 - 1
    return length


def _upright_size(path) -> tuple[int, int]:
    """(height, width) of the image as `load_image_rgb` returns it (EXIF rotation applied), header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION)
    except OSError as error:
        raise DataError(
            f"{path}: cannot read the image size ({error})", hint="re-save or remove the image"
        ) from error
    return (width, height) if orientation in _SWAPPING_ORIENTATIONS else (height, width)
