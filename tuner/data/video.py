"""Videos for Qwen-VL: which frames to sample, decoding them (PyAV), and the processor inputs they become.

A video is a file (decoded with PyAV, the optional extra `video`) or a folder or list of frame images
(ms-swift's convention; taken as frames `data.video_fps` apart).

**Frames.** A video of `total` frames at `fps` lasting `total / fps` seconds gets
`duration * data.video_fps` frames, at least `data.video_min_frames` and at most `data.video_max_frames`,
spread evenly over its *whole* length (a long video is sampled more sparsely, never cut). The count is
a multiple of the vision tower's temporal patch size (2 frames per temporal token). A video with fewer
frames than that is refused (`too-short-video`).

**Pixels.** Each frame is resized by the model's own video processor within the per-frame bounds
`data.min_pixels`..`data.max_pixels`, and the frames of one video share the total budget
`data.video_max_pixels`: each frame gets at most `video_max_pixels / frames` pixels. When even the
per-frame minimum does not fit, fewer frames are taken (still over the whole length), so one long video
cannot outgrow a step.

**Timing.** The processor gets the decoded frames with their metadata (source fps, total frames, the
sampled frame indices), from which it derives Qwen2.5-VL's `second_per_grid_ts` (absolute-time M-RoPE)
and Qwen3-VL's `<t seconds>` frame timestamps, exactly as at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from tuner.data.images import IMAGE_EXTENSIONS, load_image_rgb
from tuner.data.problems import Problem
from tuner.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

# A video is a file, a folder of frame images or a list of frame images.
VideoSource = Path | tuple[Path, ...]
VIDEO_EXTRA_HINT = "install the video extra: pip install 'tuner[video]' (PyAV)"


class UnusableVideo(DataError):
    """A video that cannot be used for training; `problem` is what `tuner data check` lists."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(f"{problem.file}: {problem.what}", hint=problem.fix)
        self.problem = problem


@dataclass(frozen=True)
class VideoSampling:
    """How videos become frames (`data.video_fps`, `video_min_frames`, `video_max_frames`,
    `video_max_pixels`) and the per-frame pixel bounds (`data.min_pixels`, `data.max_pixels`)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 128
    max_pixels: int = 4 * 768 * 768
    frame_min_pixels: int = 256 * 28 * 28 // 4
    frame_max_pixels: int = 768 * 768

    def check(self, temporal_patch: int = 2) -> None:
        """Refuse settings no video could satisfy."""
        if not 0 < self.min_frames <= self.max_frames:
            raise ConfigError(
                f"data.video_min_frames={self.min_frames} and data.video_max_frames={self.max_frames} "
                "are not a valid range",
                hint="use 0 < data.video_min_frames <= data.video_max_frames",
            )
        if self.max_pixels < temporal_patch * self.frame_min_pixels:
            raise ConfigError(
                f"data.video_max_pixels={self.max_pixels} cannot hold {temporal_patch} frames of "
                f"data.min_pixels={self.frame_min_pixels}",
                hint=f"raise data.video_max_pixels to at least {temporal_patch * self.frame_min_pixels}",
            )


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds, read without decoding its frames."""

    total_frames: int
    fps: float
    height: int
    width: int


@dataclass(frozen=True)
class FramePlan:
    """The frames sampled from one video and the pixel bounds of each of them."""

    info: VideoInfo
    indices: tuple[int, ...]
    frame_min_pixels: int
    frame_max_pixels: int

    def metadata(self) -> dict:
        """The video metadata transformers' processors read the timing from."""
        info = self.info
        return {
            "total_num_frames": info.total_frames,
            "fps": info.fps,
            "frames_indices": list(self.indices),
            "height": info.height,
            "width": info.width,
            "duration": info.total_frames / info.fps,
        }


def plan_frames(info: VideoInfo, sampling: VideoSampling, temporal_patch: int = 2) -> FramePlan:
    """Which frames of a video train, and their pixel bounds (see the module docstring).

    Raises DataError when the video has fewer frames than `temporal_patch`.
    """
    if info.total_frames < temporal_patch:
        raise DataError(
            f"the video has {info.total_frames} frame(s); the model needs at least {temporal_patch}",
            hint="use a longer clip or remove it",
        )
    wanted = round(info.total_frames / info.fps * sampling.fps)
    count = min(max(wanted, sampling.min_frames), sampling.max_frames, info.total_frames)
    # The per-frame minimum must fit the budget: fewer frames rather than an over-budget video.
    count = min(count, sampling.max_pixels // sampling.frame_min_pixels)
    count = max(count // temporal_patch * temporal_patch, temporal_patch)
    step = info.total_frames / count
    # The middle frame of each of `count` equal stretches: the whole length, evenly.
    indices = tuple(min(int((index + 0.5) * step), info.total_frames - 1) for index in range(count))
    frame_max = max(min(sampling.frame_max_pixels, sampling.max_pixels // count), sampling.frame_min_pixels)
    return FramePlan(info, indices, sampling.frame_min_pixels, frame_max)


def video_sampling_of(
    processor, fps: float, min_frames: int, max_frames: int, max_pixels: int
) -> VideoSampling:
    """The sampling settings with the per-frame bounds the processor holds (see `set_pixel_bounds`)."""
    size = processor.video_processor.size
    return VideoSampling(fps, min_frames, max_frames, max_pixels, size["shortest_edge"], size["longest_edge"])


def probe_video(source: VideoSource, frames_fps: float) -> VideoInfo:
    """Frame count, fps and size of a video without decoding its frames; frame lists/folders are
    `frames_fps` apart. Raises UnusableVideo for a missing, unreadable or empty video."""
    frames = frame_files(source)
    if frames is not None:
        if not frames:
            raise _unusable(
                source, "empty-video", "the frame folder holds no images", "add frames or remove it"
            )
        sizes = set()
        for frame in frames:
            try:
                with Image.open(frame) as image:
                    sizes.add(image.size)
            except (OSError, ValueError) as error:
                raise _unusable(
                    source, "unreadable-video", f"frame {frame.name} cannot be read ({error})", "re-save it"
                ) from None
        if len(sizes) > 1:
            raise _unusable(
                source,
                "unreadable-video",
                f"the frames differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))})",
                "give every frame of a video the same size",
            )
        width, height = sizes.pop()
        return VideoInfo(len(frames), frames_fps, height, width)
    av = _import_av()
    path = Path(source)
    if not path.is_file():
        raise _unusable(
            source, "missing-video", "the video file does not exist", "fix the path or restore the file"
        )
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _unusable(source, "unreadable-video", "the file has no video stream", "remove it")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            # The header's frame count is missing or wrong in some containers: count the packets.
            total = sum(1 for packet in container.demux(stream) if packet.size)
            width, height = stream.codec_context.width, stream.codec_context.height
    except (av.FFmpegError, OSError, ValueError) as error:
        raise _unusable(
            source,
            "unreadable-video",
            f"the video cannot be decoded ({error})",
            "re-encode it (e.g. H.264 MP4)",
        ) from None
    if total == 0:
        raise _unusable(source, "empty-video", "the video has no frames", "remove it or re-encode it")
    if not rate or not width or not height:
        raise _unusable(
            source, "unreadable-video", "the video stream has no frame rate or size", "re-encode it"
        )
    return VideoInfo(total, float(rate), height, width)


def decode_frames(source: VideoSource, plan: FramePlan) -> torch.Tensor:
    """The planned frames as a uint8 (frames, 3, height, width) tensor."""
    import torch

    frames = frame_files(source)
    if frames is not None:
        arrays = [np.asarray(load_image_rgb(frames[index])) for index in plan.indices]
    else:
        arrays = _decoded(Path(source), plan.indices)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _decoded(path: Path, indices: tuple[int, ...]) -> list[np.ndarray]:
    av = _import_av()
    # Strictly increasing (plan_frames takes at most one frame per source frame).
    wanted = {index: position for position, index in enumerate(indices)}
    arrays: list[np.ndarray | None] = [None] * len(indices)
    try:
        with av.open(str(path)) as container:
            for number, frame in enumerate(container.decode(video=0)):
                if number in wanted:
                    arrays[wanted[number]] = frame.to_ndarray(format="rgb24")
                if number >= indices[-1]:
                    break
    except (av.FFmpegError, OSError, ValueError) as error:
        raise _unusable(
            path,
            "unreadable-video",
            f"the video cannot be decoded ({error})",
            "re-encode it (e.g. H.264 MP4)",
        ) from None
    if any(array is None for array in arrays):
        decoded = sum(array is not None for array in arrays)
        raise _unusable(
            path,
            "unreadable-video",
            f"decoding stopped before frame {indices[-1] + 1} ({decoded} of {len(indices)} sampled frames)",
            "re-encode it (e.g. H.264 MP4)",
        )
    return arrays  # type: ignore[return-value]


def video_problem(source: VideoSource, sampling: VideoSampling, temporal_patch: int = 2) -> Problem | None:
    """What keeps a video from training (missing, undecodable, empty, too short), or None; decodes the
    first frame of a file so a broken stream is caught before training."""
    try:
        info = probe_video(source, sampling.fps)
        plan = plan_frames(info, sampling, temporal_patch)
        if frame_files(source) is None:
            _decoded(Path(source), plan.indices[:1])
    except UnusableVideo as error:
        return error.problem
    except DataError as error:
        return Problem(str(_name(source)), "too-short-video", str(error), error.hint or "")
    return None


def frame_files(source: VideoSource) -> tuple[Path, ...] | None:
    """The frame images of a frame list or folder (folder: image files by name); None for a video file."""
    if isinstance(source, tuple):
        return source
    if source.is_dir():
        return tuple(sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS))
    return None


def processor_size(video_processor, plan: FramePlan) -> dict[str, int]:
    """The video processor's `size` that gives each frame of `plan` its per-frame bounds.

    Qwen2-VL/2.5-VL bound each frame; Qwen3-VL's video processor bounds the pixels of all frames
    together (frames x height x width), so there the per-frame bounds are multiplied by the frame count
    (its resize rule then gives the same frame size).
    """
    frames = len(plan.indices) if _bounds_all_frames(video_processor) else 1
    return {"shortest_edge": plan.frame_min_pixels * frames, "longest_edge": plan.frame_max_pixels * frames}


def resized_frames(video_processor, frames: torch.Tensor, plan: FramePlan) -> torch.Tensor:
    """`frames` resized by the model's own video processor to the plan's bounds.

    The processor takes one `size` for all videos of a call, and videos of different lengths need
    different bounds, so each video is resized here by the processor's own `resize` and the call that
    follows (with `PASS_THROUGH_SIZE`) keeps the size: its resize of an already aligned size is the
    identity.
    """
    from transformers.image_utils import SizeDict

    resized = video_processor.resize(
        frames[None],
        size=SizeDict(**processor_size(video_processor, plan)),
        resample=video_processor.resample,
        factor=video_processor.patch_size * video_processor.merge_size,
        temporal_factor=video_processor.temporal_patch_size,
        cap_pixels_per_frame=False,
    )
    return resized[0]


# A `size` within which the processor's resize leaves frames resized by `resized_frames` as they are.
PASS_THROUGH_SIZE = {"shortest_edge": 1, "longest_edge": 2**62}


def video_tokens(processor, plan: FramePlan) -> tuple[int, str]:
    """(`<|video_pad|>` tokens, the text the processor puts in place of the video's placeholder) for
    `plan`, from the processor's own resize rule and placeholder expansion, without decoding."""
    import torch
    from transformers.video_utils import VideoMetadata

    video_processor = processor.video_processor
    patches = video_processor.get_num_of_video_patches(
        len(plan.indices),
        plan.info.height,
        plan.info.width,
        {"size": processor_size(video_processor, plan), "cap_pixels_per_frame": False},
    )
    temporal = math.ceil(len(plan.indices) / video_processor.temporal_patch_size)
    # Only the product of the spatial grid matters to the placeholder text.
    grid = torch.tensor([[temporal, patches // temporal, 1]])
    text = processor.replace_video_token(
        {"video_grid_thw": grid, "video_metadata": [VideoMetadata(**plan.metadata())]}, 0
    )
    return patches // video_processor.merge_size**2, text


def _bounds_all_frames(video_processor) -> bool:
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return isinstance(video_processor, Qwen3VLVideoProcessor)


def _import_av():
    try:
        import av
    except ImportError:
        raise DataError(
            "decoding video files needs PyAV, which is not installed", hint=VIDEO_EXTRA_HINT
        ) from None
    return av


def _name(source: VideoSource) -> Path:
    return source[0].parent if isinstance(source, tuple) and source else Path(source)  # type: ignore[arg-type]


def _unusable(source: VideoSource, kind: str, what: str, fix: str) -> UnusableVideo:
    return UnusableVideo(Problem(str(_name(source)), kind, what, fix))
