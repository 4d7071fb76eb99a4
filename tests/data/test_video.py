"""Videos: frame sampling, decoding, record parsing, and the oracle: tuner's encoded video sample equals
what the model's own processor and `get_rope_index` make of the same frames at inference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from videos import moving_square, write_frame_folder, write_video

from tuner.data.conversations import load_conversations
from tuner.data.video import (
    VideoInfo,
    VideoSampling,
    decode_frames,
    plan_frames,
    probe_video,
)
from tuner.data.vl_encoding import (
    IGNORE_INDEX,
    collate_vl,
    collate_vl_packed,
    encode_conversation,
    packed_model_inputs,
    set_pixel_bounds,
    token_length,
)
from tuner.errors import ConfigError, DataError, TunerError

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
MIN_PIXELS, MAX_PIXELS = 32 * 32, 96 * 96


def test_a_long_video_is_sampled_evenly_over_its_whole_length() -> None:
    # 10 minutes at 30 fps: 2 fps would be 1200 frames, capped at 64, spread from start to end.
    plan = plan_frames(VideoInfo(18_000, 30.0, 720, 1280), VideoSampling(max_frames=64, max_pixels=10**9))
    assert len(plan.indices) == 64
    assert plan.indices[0] < 18_000 / 64 and plan.indices[-1] > 18_000 - 18_000 / 64
    gaps = np.diff(plan.indices)
    assert gaps.min() >= 281 and gaps.max() <= 282


def test_frame_count_follows_fps_and_is_a_multiple_of_the_temporal_patch() -> None:
    sampling = VideoSampling(fps=2.0, min_frames=4, max_frames=100, max_pixels=10**9)
    assert len(plan_frames(VideoInfo(75, 25.0, 64, 64), sampling).indices) == 6  # 3 s at 2 fps
    assert len(plan_frames(VideoInfo(35, 10.0, 64, 64), sampling).indices) == 6  # 7 -> 6, aligned
    assert len(plan_frames(VideoInfo(10, 10.0, 64, 64), sampling).indices) == 4  # min_frames
    assert len(plan_frames(VideoInfo(3, 10.0, 64, 64), sampling).indices) == 2  # fewer frames than min


def test_the_pixel_budget_shrinks_frames_then_drops_frames() -> None:
    sampling = VideoSampling(fps=2.0, max_frames=100, max_pixels=20 * 10_000, frame_min_pixels=5_000)
    plan = plan_frames(VideoInfo(250, 25.0, 720, 1280), sampling)  # 10 s: 20 frames
    assert len(plan.indices) == 20 and plan.frame_max_pixels == 10_000
    # 60 frames would need 60 * 5000 px at the per-frame minimum: 40 frames fit the budget.
    plan = plan_frames(VideoInfo(750, 25.0, 720, 1280), sampling)
    assert len(plan.indices) == 40 and len(plan.indices) * plan.frame_min_pixels <= sampling.max_pixels
    assert plan.indices[-1] > 750 - 750 / 40


def test_too_short_videos_and_impossible_settings_are_refused() -> None:
    with pytest.raises(DataError, match="1 frame"):
        plan_frames(VideoInfo(1, 25.0, 64, 64), VideoSampling())
    with pytest.raises(ConfigError, match="video_max_pixels"):
        VideoSampling(max_pixels=1000, frame_min_pixels=3136).check()


def test_decoding_returns_the_planned_frames(tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.mp4", frames=8, size=64, fps=4)
    info = probe_video(clip, 2.0)
    assert (info.total_frames, info.fps, info.height, info.width) == (8, 4.0, 64, 64)
    plan = plan_frames(info, VideoSampling(min_frames=4))
    assert plan.indices == (1, 3, 5, 7)
    frames = decode_frames(clip, plan)
    assert frames.shape == (4, 3, 64, 64) and frames.dtype == torch.uint8
    # The red square moves right: each decoded frame matches its own source frame (lossy codec).
    for frame, index in zip(frames, plan.indices, strict=True):
        expected = torch.from_numpy(moving_square(index, 8, 64)).permute(2, 0, 1).float()
        assert (frame.float() - expected).abs().mean() < 8


def test_a_frame_folder_is_a_video_at_the_sampling_fps(tmp_path: Path) -> None:
    folder = write_frame_folder(tmp_path / "frames", frames=6, size=48)
    info = probe_video(folder, 2.0)
    assert (info.total_frames, info.fps) == (6, 2.0)
    frames = decode_frames(folder, plan_frames(info, VideoSampling(min_frames=4)))
    assert frames.shape == (6, 3, 48, 48)


def test_without_pyav_the_error_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    clip = write_video(tmp_path / "clip.mp4")
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(TunerError) as caught:
        probe_video(clip, 2.0)
    assert "tuner[video]" in caught.value.hint


@pytest.fixture(scope="module")
def video_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video-data")
    write_video(root / "clip.mp4", frames=8, size=64, fps=4)
    write_frame_folder(root / "frames", frames=4, size=48)
    Image.new("RGB", (40, 30), (250, 10, 10)).save(root / "red.png")
    records = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": "clip.mp4"},
                        {"type": "text", "text": "What moves?"},
                    ],
                },
                {"role": "assistant", "content": "A red square, to the right."},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "<image>\n<video>\nSame colour?"},
                {"from": "gpt", "value": "Yes."},
            ],
            "images": ["red.png"],
            "videos": ["frames"],
        },
        {
            "messages": [
                {"role": "user", "content": "<video>Frames as a list."},
                {"role": "assistant", "content": "Moving."},
            ],
            "videos": [[f"frames/frame_{index:03d}.png" for index in range(4)]],
        },
    ]
    (root / "train.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    return root


def test_video_records_parse_in_both_formats(video_data: Path) -> None:
    scan = load_conversations(video_data / "train.jsonl")
    assert scan.problems == []
    first, mixed, listed = scan.conversations
    assert first.videos == (video_data / "clip.mp4",)
    assert first.messages[0]["content"][0] == {"type": "video"}
    assert mixed.images == [video_data / "red.png"] and mixed.videos == (video_data / "frames",)
    assert [part["type"] for part in mixed.messages[0]["content"]] == ["image", "text", "video", "text"]
    assert listed.videos == (tuple(video_data / "frames" / f"frame_{i:03d}.png" for i in range(4)),)


def test_bad_videos_are_problems(tmp_path: Path) -> None:
    write_video(tmp_path / "one.mp4", frames=1)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video at all")
    (tmp_path / "empty.mp4").write_bytes(b"")

    def record(video: str, answer: str = "ok") -> dict:
        return {
            "messages": [{"role": "user", "content": "<video>?"}, {"role": "assistant", "content": answer}],
            "videos": [video],
        }

    records = [
        record("one.mp4"),
        record("broken.mp4"),
        record("empty.mp4"),
        record("missing.mp4"),
        record("../outside.mp4"),
        {
            "messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "<video>"}],
            "videos": ["one.mp4"],
        },
        {
            "messages": [
                {"role": "user", "content": "<video> <video>?"},
                {"role": "assistant", "content": "x"},
            ],
            "videos": ["one.mp4"],
        },
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    scan = load_conversations(tmp_path / "train.jsonl")
    kinds = {(problem.record, problem.kind) for problem in scan.problems}
    assert {
        (1, "too-short-video"),
        (2, "unreadable-video"),
        (3, "unreadable-video"),
        (4, "missing-video"),
        (5, "path-escape"),
        (6, "video-in-answer"),
        (7, "video-count-mismatch"),
    } <= kinds
    assert len(scan.conversations) == 0


def _oracle_size(family: str, frames: int, frame_max: int) -> dict:
    """The size a user passes to the family's processor for these per-frame bounds (Qwen3-VL's video
    processor bounds all frames together)."""
    count = frames if family == "qwen3-vl" else 1
    return {"shortest_edge": MIN_PIXELS * count, "longest_edge": frame_max * count}


@pytest.mark.parametrize("family", FAMILIES)
def test_encoded_video_sample_equals_the_processor_and_model_at_inference(
    family: str, tiny_model, video_data: Path
) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tuner.models.qwenvl import rope_index_of

    path = tiny_model(family)
    processor = AutoProcessor.from_pretrained(path)
    set_pixel_bounds(processor, MIN_PIXELS, MAX_PIXELS)
    model = AutoModelForImageTextToText.from_pretrained(path)
    # A budget that shrinks the 64x64 frames below their size: the bounds must act the same in both.
    sampling = VideoSampling(max_pixels=4 * 48 * 48, frame_min_pixels=MIN_PIXELS, frame_max_pixels=MAX_PIXELS)
    conversations = load_conversations(video_data / "train.jsonl").conversations
    conversation = conversations[0]
    sample = encode_conversation(processor, conversation, video=sampling)
    # Length grouping and the over-length check read token_length: it must be the encoded length for a
    # video file, an image beside a frame folder and a frame list, whatever a release wraps videos in.
    assert token_length(processor, conversation, sampling) == len(sample.input_ids)
    for other in conversations[1:]:
        encoded = encode_conversation(processor, other, video=sampling)
        assert token_length(processor, other, sampling) == len(encoded.input_ids), other.source

    # Inference: the same frames and metadata straight into the processor, positions from the model.
    plan = plan_frames(probe_video(video_data / "clip.mp4", 2.0), sampling)
    frames = decode_frames(video_data / "clip.mp4", plan)
    text = processor.apply_chat_template(conversation.messages, tokenize=False)
    expected = processor(
        text=[text],
        videos=[frames],
        video_metadata=[plan.metadata()],
        do_sample_frames=False,
        size=_oracle_size(family, len(plan.indices), plan.frame_max_pixels),
        cap_pixels_per_frame=False,
        return_tensors="pt",
    )
    assert torch.equal(sample.input_ids, expected["input_ids"][0])
    assert torch.equal(sample.pixel_values_videos, expected["pixel_values_videos"])
    assert torch.equal(sample.video_grid_thw, expected["video_grid_thw"])
    assert sample.video_grid_thw[0, 0] == 2  # 4 frames, 2 per temporal patch
    positions, _ = model.model.get_rope_index(
        expected["input_ids"],
        mm_token_type_ids=expected["mm_token_type_ids"],
        video_grid_thw=expected["video_grid_thw"],
        second_per_grid_ts=expected.get("second_per_grid_ts"),
    )
    if family == "qwen2.5-vl":
        # 4 of 8 frames at 4 fps: 2 fps sampled, 2 frames per temporal patch -> 1 s per patch.
        assert sample.second_per_grid_ts.tolist() == [1.0]
        assert torch.equal(
            torch.as_tensor(expected["second_per_grid_ts"], dtype=torch.float), sample.second_per_grid_ts
        )
    if family == "qwen3-vl":
        # Qwen3-VL writes each temporal patch's place in the clip into the prompt, computed by the
        # processor from the metadata's frame indices and fps. The tokens equal the processor's own
        # (above); a plan whose metadata named other frames must give another prompt.
        assert plan.indices == (1, 3, 5, 7)
        shifted = {**plan.metadata(), "frames_indices": [index + 8 for index in plan.indices]}
        other = processor(
            text=[text],
            videos=[frames],
            video_metadata=[shifted],
            do_sample_frames=False,
            size=_oracle_size(family, len(plan.indices), plan.frame_max_pixels),
            cap_pixels_per_frame=False,
            return_tensors="pt",
        )
        assert not torch.equal(sample.input_ids, other["input_ids"][0])
    # Packed beside an image sample, the video sample keeps its own positions (per-sample rope index).
    image_sample = encode_conversation(processor, conversations[1], video=sampling)
    packed = packed_model_inputs(collate_vl_packed([image_sample, sample]), rope_index_of(model))
    assert torch.equal(packed["position_ids"][1:, :, len(image_sample.input_ids) :], positions)
    # Padded, mixed image + video batch: the model trains on it.
    batch = collate_vl([image_sample, sample], pad_token_id=processor.tokenizer.pad_token_id)
    assert batch["pixel_values_videos"].shape[0] == sum(
        int(s.video_grid_thw.prod(dim=1).sum()) for s in (image_sample, sample)
    )
    loss = model(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
@pytest.mark.parametrize("cut_in", ["first frame", "last frame"])
def test_truncation_never_cuts_inside_a_video(family: str, cut_in: str, tiny_model, tmp_path: Path) -> None:
    from transformers import AutoProcessor

    write_video(tmp_path / "clip.mp4")  # 2 s: 4 frames at 2 fps, 2 temporal patches
    record = {
        "messages": [
            {"role": "user", "content": "Describe."},
            {"role": "assistant", "content": "First answer."},
            {"role": "user", "content": "<video> And now?"},
            {"role": "assistant", "content": "Second."},
        ],
        "videos": ["clip.mp4"],
    }
    (tmp_path / "train.jsonl").write_text(json.dumps(record))
    processor = AutoProcessor.from_pretrained(tiny_model(family))
    set_pixel_bounds(processor, MIN_PIXELS, MAX_PIXELS)
    conversation = load_conversations(tmp_path / "train.jsonl").conversations[0]
    full = encode_conversation(processor, conversation)
    starts = (full.input_ids == processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")).nonzero()
    # Qwen3-VL wraps each temporal patch in its own pair (transformers 5.25: without the template's
    # pair around them all), so a cut inside the last one falls between frames of the video.
    inside = int(starts[0]) + 4 if cut_in == "first frame" else int(starts[-1]) + 2
    cut = encode_conversation(processor, conversation, max_length=inside, overlength="truncate")
    # Everything before the video's placeholder is kept, nothing of the video (its timestamps included).
    text = processor.apply_chat_template(conversation.messages, tokenize=False)
    before = processor.tokenizer(text[: text.index("<|vision_start|><|video_pad|>")])["input_ids"]
    assert cut.input_ids.tolist() == before == full.input_ids[: len(before)].tolist()
    assert cut.pixel_values_videos is None and cut.video_grid_thw is None
    assert (cut.labels != IGNORE_INDEX).any()
