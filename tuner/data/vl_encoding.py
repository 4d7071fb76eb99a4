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
This needs each rendering to be a prefix of the next one. A template that rewrites earlier turns
(Qwen3 Thinking templates drop the `<think>` blocks of past turns) breaks that: such conversations are
split into one sample per reply beforehand (`tuner.data.thinking.TrainingSamples`), and a sample whose
`supervised_replies` is "last" supervises its final reply alone, located the same way.

**Videos.** Frames are sampled and decoded by tuner.data.video and handed to the processor with their
metadata, so the processor makes the pixels, the grid, the placeholder expansion (Qwen3-VL: with
`<t seconds>` frame timestamps) and Qwen2.5-VL's `second_per_grid_ts`, as at inference. A video's
tokens are never cut: truncation stops before the whole `<|vision_start|>...<|vision_end|>` block.

**Boxes.** `<box>` placeholders become the record's grounding boxes in the family's convention
(`tuner.data.grounding.write_boxes`) before anything is rendered.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from tuner.data.conversations import Conversation
from tuner.data.grounding import write_boxes
from tuner.data.images import DEFAULT_MAX_PIXELS, load_image_rgb, upright_size
from tuner.data.video import (
    PASS_THROUGH_SIZE,
    VideoSampling,
    decode_frames,
    plan_frames,
    probe_video,
    resized_frames,
    video_tokens,
)
from tuner.errors import ConfigError, ModelError

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
_HEADER_PROBE = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
# Keys of a packed batch that say where its samples lie; `packed_model_inputs` turns them into
# position ids and removes them before the batch reaches the model.
SAMPLE_LENGTHS = "sample_lengths"
SAMPLE_IMAGE_COUNTS = "sample_image_counts"
SAMPLE_VIDEO_COUNTS = "sample_video_counts"


@dataclass
class EncodedSample:
    """One conversation as model inputs; `labels` is -100 where no loss is taken."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    source: str
    # 1 on image tokens, 2 on video tokens: transformers 5.23's Qwen-VL models need it to place images
    # and videos in M-RoPE.
    mm_token_type_ids: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    # Qwen2.5-VL: seconds per temporal patch of each video (its absolute-time M-RoPE); None otherwise.
    second_per_grid_ts: torch.Tensor | None = None


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
    video: VideoSampling | None = None,
) -> EncodedSample | None:
    """Tokens, labels and pixels of `conversation`; None when it is too long and cannot be used.

    Longer than `max_length` tokens: `drop` returns None; `truncate` cuts at `max_length`, moving the
    cut back to before an image or video whose tokens it would split (its pixels go too), and returns
    None when no supervised token is left. `background` fills transparent pixels; images with more
    than `max_image_pixels` pixels are refused (`data.background`, `data.max_image_pixels`). `video`:
    how videos become frames (default: VideoSampling() with the processor's per-frame bounds).
    """
    if overlength not in ("drop", "truncate"):
        raise ConfigError(
            f"data.overlength={overlength!r} is not 'drop' or 'truncate'",
            hint="set data.overlength to drop (skip long samples) or truncate",
        )
    conversation = write_boxes(processor, conversation)
    text, reply_spans = render_with_reply_spans(processor, conversation)
    images = [load_image_rgb(path, background, max_image_pixels) for path in conversation.images]
    encoded = processor(
        text=[text],
        images=images or None,
        **video_inputs(processor, conversation.videos, video),
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
    videos = bool(conversation.videos)
    second_per_grid_ts = encoded.get("second_per_grid_ts")
    sample = EncodedSample(
        input_ids=input_ids,
        labels=labels,
        pixel_values=torch.as_tensor(encoded["pixel_values"]) if images else None,
        image_grid_thw=torch.as_tensor(encoded["image_grid_thw"], dtype=torch.long) if images else None,
        source=conversation.source,
        mm_token_type_ids=mm_token_type_ids,
        pixel_values_videos=torch.as_tensor(encoded["pixel_values_videos"]) if videos else None,
        video_grid_thw=torch.as_tensor(encoded["video_grid_thw"], dtype=torch.long) if videos else None,
        second_per_grid_ts=None
        if second_per_grid_ts is None
        else torch.as_tensor(second_per_grid_ts, dtype=torch.float),
    )
    if max_length is None or len(input_ids) <= max_length:
        return sample
    if overlength == "drop":
        return None
    blocks = _media_blocks(
        processor, input_ids, encoded["offset_mapping"][0], encoded["text_replacement_offsets"][0]
    )
    return _truncated(sample, blocks, max_length)


def video_inputs(processor, videos: tuple, sampling: VideoSampling | None = None) -> dict:
    """The processor-call arguments for `videos` (none without videos): the sampled frames, each already
    resized by the processor's own rule to its video's bounds, with the metadata the timing comes from."""
    if not videos:
        return {}
    video_processor = processor.video_processor
    frames, metadata = [], []
    for source in videos:
        plan = video_plan(processor, source, sampling)
        frames.append(resized_frames(video_processor, decode_frames(source, plan), plan))
        metadata.append(plan.metadata())
    return {
        "videos": frames,
        "videos_kwargs": {
            "video_metadata": metadata,
            "do_sample_frames": False,
            "size": PASS_THROUGH_SIZE,
            # The pixel budget is tuner's (data.video_max_pixels), applied in `resized_frames`.
            "cap_pixels_per_frame": False,
        },
    }


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
    if conversation.supervised_replies == "last":
        before = processor.apply_chat_template(messages[:-1], tokenize=False) if len(messages) > 1 else ""
        rendered = processor.apply_chat_template(messages, tokenize=False)
        if messages[-1]["role"] != "assistant" or not rendered.startswith(before):
            raise ModelError(
                f"{conversation.source}: the chat template renders the turns before the last reply "
                "differently once the reply follows them",
                hint="use the model's original chat template",
            )
        return rendered, [_reply_span(before, rendered, header, conversation.source, len(messages))]
    rendered = ""
    reply_spans = []
    for count in range(1, len(messages) + 1):
        longer = processor.apply_chat_template(messages[:count], tokenize=False)
        if not longer.startswith(rendered):
            raise ModelError(
                f"{conversation.source}: the chat template renders message {count - 1} differently once "
                f"message {count} follows it, so the answer tokens cannot be located",
                hint="split such conversations into one sample per reply first "
                "(tuner.data.thinking.TrainingSamples does this for training)",
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


def _truncated(
    sample: EncodedSample, blocks: list[tuple[int, int, str]], max_length: int
) -> EncodedSample | None:
    cut = max_length
    kept = {"image": 0, "video": 0}
    for start, end, kind in blocks:
        if end < cut:
            kept[kind] += 1
        else:
            cut = min(cut, start)
            break
    labels = sample.labels[:cut]
    if not (labels != IGNORE_INDEX).any():
        return None
    pixel_values = image_grid_thw = pixel_values_videos = video_grid_thw = None
    if kept["image"]:
        image_grid_thw = sample.image_grid_thw[: kept["image"]]
        pixel_values = sample.pixel_values[: int(image_grid_thw.prod(dim=1).sum())]
    if kept["video"]:
        video_grid_thw = sample.video_grid_thw[: kept["video"]]
        pixel_values_videos = sample.pixel_values_videos[: int(video_grid_thw.prod(dim=1).sum())]
    second_per_grid_ts = sample.second_per_grid_ts
    if second_per_grid_ts is not None:
        second_per_grid_ts = second_per_grid_ts[: kept["video"]] if kept["video"] else None
    return EncodedSample(
        input_ids=sample.input_ids[:cut],
        labels=labels,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        source=sample.source,
        mm_token_type_ids=None if sample.mm_token_type_ids is None else sample.mm_token_type_ids[:cut],
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
    )


def _media_blocks(
    processor, input_ids: torch.Tensor, offsets: list[tuple[int, int]], replacements: list[dict]
) -> list[tuple[int, int, str]]:
    """`(first, last, "image" | "video")` token positions of each image's and video's tokens, in order,
    from where the processor put each placeholder's replacement (`text_replacement_offsets`), widened to
    the `<|vision_start|>`...`<|vision_end|>` pair around it when there is one.

    Read from the processor's output because the wrapping differs by release: Qwen3-VL's replacement is
    one `<|vision_start|>`...`<|vision_end|>` pair per temporal patch, which transformers 5.23 and 5.24
    leave inside the template's own pair and 5.25 does not (it drops the template's pair)."""
    tokenizer = processor.tokenizer
    start_id = tokenizer.convert_tokens_to_ids(VISION_START)
    end_id = tokenizer.convert_tokens_to_ids(VISION_END)
    token_starts = [start for start, _ in offsets]
    token_ends = [end for _, end in offsets]
    ids = input_ids.tolist()
    blocks = []
    for replacement in replacements:
        begin, finish = replacement["new_span"]
        first = bisect.bisect_right(token_ends, begin)  # the first token ending after the span starts
        last = bisect.bisect_left(token_starts, finish) - 1  # the last token starting before it ends
        if first > 0 and last + 1 < len(ids) and ids[first - 1] == start_id and ids[last + 1] == end_id:
            first, last = first - 1, last + 1
        blocks.append((first, last, replacement["type"]))
    return blocks


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
    return batch | _media_of(samples)


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
        SAMPLE_VIDEO_COUNTS: tuple(0 if s.video_grid_thw is None else len(s.video_grid_thw) for s in samples),
    }
    if any(s.mm_token_type_ids is not None for s in samples):
        batch["mm_token_type_ids"] = torch.cat([_token_types(s) for s in samples])[None]
    return batch | _media_of(samples)


def _token_types(sample: EncodedSample) -> torch.Tensor:
    """The sample's modality per token (0 text, 1 image); all text when the processor gave none."""
    if sample.mm_token_type_ids is not None:
        return sample.mm_token_type_ids
    return torch.zeros_like(sample.input_ids)


def _media_of(samples: list[EncodedSample]) -> dict[str, torch.Tensor]:
    """`pixel_values` and `image_grid_thw` of every image, `pixel_values_videos`, `video_grid_thw` (and
    Qwen2.5-VL's `second_per_grid_ts`) of every video, in sample order; empty without any."""
    media = {}
    with_images = [s for s in samples if s.pixel_values is not None]
    if with_images:
        media["pixel_values"] = torch.cat([s.pixel_values for s in with_images])
        media["image_grid_thw"] = torch.cat([s.image_grid_thw for s in with_images])
    with_videos = [s for s in samples if s.pixel_values_videos is not None]
    if with_videos:
        media["pixel_values_videos"] = torch.cat([s.pixel_values_videos for s in with_videos])
        media["video_grid_thw"] = torch.cat([s.video_grid_thw for s in with_videos])
        if any(s.second_per_grid_ts is not None for s in with_videos):
            media["second_per_grid_ts"] = torch.cat([s.second_per_grid_ts for s in with_videos])
    return media


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
    records = (SAMPLE_LENGTHS, SAMPLE_IMAGE_COUNTS, SAMPLE_VIDEO_COUNTS)
    inputs = {key: value for key, value in batch.items() if key not in records}
    input_ids = batch["input_ids"]
    token_types = batch.get("mm_token_type_ids")
    grids = batch.get("image_grid_thw")
    video_grids = batch.get("video_grid_thw")
    seconds = batch.get("second_per_grid_ts")
    video_counts = batch.get(SAMPLE_VIDEO_COUNTS) or (0,) * len(batch[SAMPLE_LENGTHS])
    segments = []
    start = first_image = first_video = 0
    for length, images, videos in zip(
        batch[SAMPLE_LENGTHS], batch[SAMPLE_IMAGE_COUNTS], video_counts, strict=True
    ):
        end = start + length
        text_positions = torch.arange(length, device=input_ids.device).view(1, 1, -1)
        if images or videos:
            if token_types is None:
                raise ModelError(
                    "a packed batch with images or videos has no mm_token_type_ids to place them in M-RoPE",
                    hint="set data.packing: false, or update transformers",
                )
            videos_of_sample = slice(first_video, first_video + videos)
            rope_positions, _ = rope_index(
                input_ids[:, start:end],
                mm_token_type_ids=token_types[:, start:end],
                image_grid_thw=grids[first_image : first_image + images] if images else None,
                video_grid_thw=video_grids[videos_of_sample] if videos else None,
                second_per_grid_ts=seconds[videos_of_sample] if videos and seconds is not None else None,
            )
        else:
            rope_positions = text_positions.expand(3, 1, -1)
        segments.append(torch.cat([text_positions, rope_positions.to(text_positions.dtype)]))
        start, first_image, first_video = end, first_image + images, first_video + videos
    inputs["position_ids"] = torch.cat(segments, dim=2)
    inputs["use_cache"] = False
    return inputs


def samples_in_batch(batch: dict) -> int:
    """How many samples a padded or packed batch holds."""
    if SAMPLE_LENGTHS in batch:
        return len(batch[SAMPLE_LENGTHS])
    return batch["input_ids"].shape[0]


def token_length(processor, conversation: Conversation, video: VideoSampling | None = None) -> int:
    """The exact number of tokens `encode_conversation` produces, without decoding any image or video.

    The placeholders are expanded by the processor itself (`get_text_with_replacements`, the step its
    `__call__` takes before tokenizing) with the replacement each image and video gets, so whatever a
    transformers release does around them is counted as it does it (5.25 drops the template's
    `<|vision_start|>`/`<|vision_end|>` around a Qwen3-VL video, 5.23 keeps it). Image token counts come
    from the image size in the file header and the processor's own resize rule (the current pixel bounds
    included); video token counts from the video's frame count, rate and size (`video_tokens`).
    """
    conversation = write_boxes(processor, conversation)
    text = processor.apply_chat_template(conversation.messages, tokenize=False)
    image_processor = processor.image_processor
    image_replacements = []
    for path in conversation.images:
        width, height = upright_size(path)
        patches = image_processor.get_number_of_image_patches(height, width, {})
        # Only the grid's product matters to the replacement text.
        grid = torch.tensor([[1, patches, 1]])
        image_replacements.append(processor.replace_image_token({"image_grid_thw": grid}, 0))
    video_replacements = [
        video_tokens(processor, video_plan(processor, source, video))[1] for source in conversation.videos
    ]
    (expanded,), _ = processor.get_text_with_replacements([text], image_replacements, video_replacements)
    return len(processor.tokenizer(expanded)["input_ids"])


def video_plan(processor, source, video: VideoSampling | None = None):
    """The frames `encode_conversation` samples from `source` (a `tuner.data.video.FramePlan`)."""
    video_processor = processor.video_processor
    if video is None:
        size = video_processor.size
        video = VideoSampling(frame_min_pixels=size["shortest_edge"], frame_max_pixels=size["longest_edge"])
    return plan_frames(probe_video(source, video.fps), video, video_processor.temporal_patch_size)
