"""`tuner data check`: read a whole dataset the way training would and report every problem in it.

The scanners (captions, conversations) find layout and record problems; this module decodes every
image the way training will, adds what only a whole-dataset view shows (duplicates, size limits,
statistics) and renders one report. Training prints the head of the same report before it refuses
dirty data, so a problem reads the same in both places.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tuner.config.schema import DataSource
from tuner.data.buckets import bucket_histogram, nearest_bucket, sdxl_buckets
from tuner.data.captions import DatasetRow, scan_caption_dataset
from tuner.data.conversations import Conversation, load_conversations
from tuner.data.images import DEFAULT_MAX_PIXELS, inspect_image, upright_size
from tuner.data.masks import find_masks
from tuner.data.mixing import (
    balance_regularisation,
    epoch_buckets,
    format_mix,
    is_plain,
    mix_rows,
    split_portions,
)
from tuner.data.problems import Problem
from tuner.data.video import (
    VideoSampling,
    VideoSource,
    plan_frames,
    probe_video,
    video_problem,
    video_tokens,
)

# SDXL trains at ~1024 px; below 64 px a picture is mostly upscaling blur.
SDXL_MIN_SIZE = 64
# One merged 28 px patch of Qwen2/2.5-VL: anything smaller is blown up before it becomes a single token.
QWENVL_MIN_SIZE = 28
# transformers' Qwen-VL `smart_resize` (5.23) raises for an aspect ratio above 200.
QWENVL_MAX_ASPECT = 200
# The most caption tokens SDXL trains (data.max_caption_tokens: three CLIP windows, as kohya's).
MAX_CAPTION_TOKENS = 225
_STAT_LABELS = {
    "width": "image width (px)",
    "height": "image height (px)",
    "aspect": "aspect (width/height)",
    "caption_words": "caption (words)",
    "text_words": "text (words)",
    "tokens": "length (tokens)",
    "video_frames": "frames per video",
    "video_tokens": "tokens per video",
    "captions_from_folder_names": "kohya folder captions",
    "captions_from_class_prompt": "class prompt captions",
}


@dataclass
class DataReport:
    """What `tuner data check` found: every problem, the samples that are fine and summary numbers."""

    kind: str  # "sdxl" | "qwenvl"
    path: str
    samples_ok: int
    problems: list[Problem]
    stats: dict
    histogram: str  # the bucket (SDXL) or token-length (Qwen-VL) histogram
    # Samples that train but may be a mistake (duplicates): reported, never refused, counted in samples_ok.
    warnings: list[Problem] = field(default_factory=list)
    # SDXL with repeats or several sources: one row per folder (`tuner.data.mixing.mix_rows`).
    mix: list[dict] = field(default_factory=list)

    def problem_counts(self) -> dict[str, int]:
        """Problems per kind, most frequent first."""
        return _counts(self.problems)

    def warning_counts(self) -> dict[str, int]:
        """Warnings per kind, most frequent first."""
        return _counts(self.warnings)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "path": self.path,
            "clean": not self.problems,
            "samples_ok": self.samples_ok,
            "problem_count": len(self.problems),
            "problem_counts": self.problem_counts(),
            "problems": [asdict(problem) for problem in self.problems],
            "warning_count": len(self.warnings),
            "warning_counts": self.warning_counts(),
            "warnings": [asdict(warning) for warning in self.warnings],
            "stats": self.stats,
            "histogram": self.histogram,
            "mix": self.mix,
        }

    def format_text(self, limit: int | None = None) -> str:
        """Problem lines, then warning lines (the first `limit` of each, then a count of the rest), then
        the summary."""
        lines = [
            *self.format_lines(self.problems, limit),
            *self.format_lines(self.warnings, limit, "warning: "),
        ]
        if lines:
            lines.append("")
        counts = ", ".join(f"{kind} {count}" for kind, count in self.problem_counts().items())
        warning_counts = ", ".join(f"{kind} {count}" for kind, count in self.warning_counts().items())
        lines.append(
            f"{self.kind} dataset {self.path}: {self.samples_ok} samples ok, "
            f"{len(self.problems)} problem{'' if len(self.problems) == 1 else 's'}"
            + (f" ({counts})" if counts else "")
            + (
                f", {len(self.warnings)} warning{'' if len(self.warnings) == 1 else 's'} ({warning_counts})"
                if self.warnings
                else ""
            )
        )
        lines.extend(_format_stats(self.stats))
        if self.mix:
            lines.extend(["", format_mix(self.mix)])
        if self.histogram:
            lines.extend(["", self.histogram])
        return "\n".join(lines)

    def format_lines(self, items: Sequence[Problem], limit: int | None, prefix: str = "") -> list[str]:
        """One line per item (the first `limit`), then a count of the rest."""
        shown = items if limit is None else items[:limit]
        lines = [f"{prefix}{item}" for item in shown]
        if len(items) > len(shown):
            lines.append(
                f"{prefix}... and {len(items) - len(shown)} more "
                f"(`tuner data check {self.kind} {self.path}` lists them all)"
            )
        return lines


def check_sdxl_dataset(
    path: str | Path,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    resolution: int = 1024,
    bucket_step: int = 64,
    batch_size: int = 1,
    min_size: int = SDXL_MIN_SIZE,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    masked_loss: bool = False,
    mask_dir: str | Path | None = None,
    repeats: float | None = None,
    more_sources: Sequence[DataSource] = (),
    class_prompt: str | None = None,
    count_caption_tokens: Callable[[str], int] | None = None,
    max_caption_tokens: int = 75,
) -> DataReport:
    """Check a captioned-image dataset (any layout `scan_caption_dataset` reads), decoding every image.

    `repeats` (else kohya `N_words/` folder prefixes) and `more_sources` (more instance folders, and
    regularisation ones whose images are captioned with `class_prompt` when they have no caption file)
    are checked alike and reported
    as training mixes them: `mix` holds images, repeats and samples per epoch per folder, the histogram
    counts samples per epoch, and `stats` counts the captions filled from folder names or the class prompt.

    With `masked_loss`, also find every image's loss mask (`tuner.data.masks.find_masks`): mask problems
    (size mismatch, all black, unreadable) join the problems, and `stats["masks"]` counts the images
    with a mask file, an alpha-channel mask and none.

    With `count_caption_tokens` (the model's tokenizer, `caption_token_count`), `stats["caption_tokens"]`
    says how many captions training cuts at `max_caption_tokens` (`caption_cuts`)."""
    buckets = sdxl_buckets(resolution, bucket_step)
    sources = [DataSource(path=str(path), repeats=repeats), *more_sources]
    scans = [
        scan_caption_dataset(
            source.path,
            image_column,
            caption_column,
            check_images=True,
            max_pixels=max_image_pixels,
            min_side=min_size,
            class_prompt=class_prompt if source.reg else None,
        )
        for source in sources
    ]
    portions = balance_regularisation(
        [
            portion
            for source, scan in zip(sources, scans, strict=True)
            for portion in split_portions(source, scan)
        ]
    )
    scan = scans[0]  # the layout reported is data.path's
    samples = [sample for portion in portions for sample in portion.samples]
    problems = [problem for each in scans for problem in each.problems]
    warnings = [warning for each in scans for warning in each.warnings]
    filled: Counter[str] = Counter()
    for each in scans:
        for origin, count in each.filled_captions.items():
            filled["class prompt" if origin == "class prompt" else "folder name"] += count
    mask_stats: dict = {}
    if masked_loss:
        masks = find_masks(samples, mask_dir, max_image_pixels)
        samples, problems = masks.samples, problems + masks.problems
        counts = masks.counts
        mask_stats = {"masks_from_files": counts.files, "masks_from_alpha": counts.alpha}
        mask_stats["images_without_mask"] = counts.none
    sizes = [upright_size(_encoded(sample.image)) for sample in samples]
    stats: dict = {
        "layout": scan.layout,
        **_image_stats(sizes),
        "caption_words": _spread([len(sample.caption.split()) for sample in samples]),
        "resolution": resolution,
        "batch_size": batch_size,
        **mask_stats,
        "captions_from_folder_names": filled["folder name"] or None,
        "captions_from_class_prompt": filled["class prompt"] or None,
    }
    if count_caption_tokens is not None:
        stats["caption_tokens"] = caption_cuts(
            [sample.caption for sample in samples], count_caption_tokens, max_caption_tokens
        ).line()
    # Bucket per image of every portion (also the ones a mask problem leaves out: the mix is the plan).
    image_buckets = [
        nearest_bucket(*upright_size(_encoded(sample.image)), buckets)
        for portion in portions
        for sample in portion.samples
    ]
    mix = mix_rows(portions, image_buckets)
    plain = is_plain(portions)
    assignments = image_buckets if plain else epoch_buckets(portions, image_buckets)
    histogram = bucket_histogram(assignments, batch_size, "images" if plain else "samples")
    return DataReport(
        "sdxl",
        " + ".join(source.path for source in sources),
        len(samples),
        _in_file_order(problems),
        stats,
        histogram if assignments else "",
        _in_file_order(warnings),
        mix=[] if plain else mix,
    )


@dataclass(frozen=True)
class CaptionCuts:
    """How many captions are longer than the tokens training encodes (the rest of each is cut off)."""

    captions: int
    cut: int
    longest: int
    max_caption_tokens: int

    def line(self) -> str:
        said = (
            f"{self.cut} of {self.captions} captions are longer than {self.max_caption_tokens} tokens "
            f"(longest {self.longest}) and are cut there"
        )
        if self.cut and self.max_caption_tokens < MAX_CAPTION_TOKENS:
            said += f"; data.max_caption_tokens={MAX_CAPTION_TOKENS} trains up to {MAX_CAPTION_TOKENS}"
        return said


def caption_cuts(
    captions: Sequence[str], count_tokens: Callable[[str], int], max_caption_tokens: int
) -> CaptionCuts:
    """Count the captions over `max_caption_tokens` (`data.max_caption_tokens`), tokens counted by
    `count_tokens` without BOS/EOS; every distinct caption is tokenized once."""
    lengths = {caption: count_tokens(caption) for caption in set(captions)}
    cut = sum(lengths[caption] > max_caption_tokens for caption in captions)
    return CaptionCuts(len(captions), cut, max(lengths.values(), default=0), max_caption_tokens)


def check_qwenvl_dataset(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    processor: Any = None,
    max_pixels: int = 768 * 768,
    min_pixels: int = 256 * 28 * 28 // 4,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = QWENVL_MIN_SIZE,
    max_length: int = 2048,
    video: VideoSampling | None = None,
) -> DataReport:
    """Check a Qwen-VL conversation dataset, decoding every image; with a `processor`, also measure every
    sample in tokens.

    Videos are probed and their first frame decoded (missing, undecodable, empty and too-short videos are
    problems); the statistics say how many frames each video is sampled to and, with a `processor`, how
    many tokens it becomes (`video` says how frames are sampled; default: training's defaults).

    `processor` should be built with `min_pixels`/`max_pixels` (they decide how many tokens an image
    becomes); here they are only recorded in the statistics.
    """
    if processor is not None:
        from tuner.data.thinking import TrainingSamples
        from tuner.data.vl_encoding import token_length  # torch: only when measuring tokens
    scan = load_conversations(path, image_root, check_images=False)
    problems = list(scan.problems)
    images: dict[Path, _ImageFacts | Problem] = {}
    video = video or VideoSampling(frame_min_pixels=min_pixels, frame_max_pixels=max_pixels)
    videos: dict[VideoSource, tuple[int, int | None] | Problem] = {}
    duplicates = DuplicateConversations()
    usable = 0
    images_per_sample: list[int] = []
    text_words: list[int] = []
    lengths: list[int] = []
    for conversation in scan.conversations:
        data_file, record = _split_source(conversation.source)
        root = Path(image_root) if image_root is not None else Path(data_file).parent
        found: list[Problem] = []
        digests: list[str] = []
        for image in conversation.images:
            if image not in images:
                images[image] = _inspect(image, max_image_pixels, min_size)
            facts = images[image]
            if isinstance(facts, Problem):
                what = f"image {os.path.relpath(image, root)}: {facts.what}"
                found.append(replace(facts, file=data_file, record=record, what=what))
            else:
                digests.append(facts.digest)
        for source in conversation.videos:
            if source not in videos:
                videos[source] = _inspect_video(source, video, processor)
            facts = videos[source]
            if isinstance(facts, Problem):
                name = os.path.relpath(facts.file, root)
                what = f"video {name}: {facts.what}"
                found.append(replace(facts, file=data_file, record=record, what=what))
        if not found:
            duplicates.note(conversation, digests)
        problems.extend(found)
        if not found:
            usable += 1
            images_per_sample.append(len(conversation.images))
            text_words.append(_text_words(conversation.messages))
            if processor is not None:
                # One length per training sample: a template that rewrites earlier turns (Qwen3
                # Thinking) trains a conversation as one sample per reply.
                samples = TrainingSamples.build(processor, [conversation], "keep")
                lengths.extend(token_length(processor, sample, video) for sample in samples)

    sizes = [(facts.width, facts.height) for facts in images.values() if isinstance(facts, _ImageFacts)]
    stats: dict = {
        "images": len(sizes),
        **_image_stats(sizes),
        "images_per_sample": _spread(images_per_sample),
        "text_words": _spread(text_words),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
    }
    sampled = [facts for facts in videos.values() if not isinstance(facts, Problem)]
    if videos:
        stats["videos"] = len(sampled)
        stats["video_frames"] = _spread([frames for frames, _ in sampled])
        stats["video_tokens"] = _spread([tokens for _, tokens in sampled if tokens is not None])
    histogram = ""
    if lengths:
        stats["tokens"] = _spread(lengths)
        stats["max_length"] = max_length
        stats["over_max_length"] = sum(length > max_length for length in lengths)
        histogram = token_length_histogram(lengths, max_length)
    return DataReport(
        "qwenvl",
        str(path),
        usable,
        _in_file_order(problems),
        stats,
        histogram,
        _in_file_order(duplicates.warnings),
    )


class DuplicateConversations:
    """Warnings for conversations that repeat an earlier one: the same messages and image contents."""

    def __init__(self) -> None:
        # Keyed by a digest, not the text: a large dataset's check must not hold every conversation.
        self.first_places: dict[str, str] = {}
        self.warnings: list[Problem] = []

    def note(self, conversation: Conversation, image_digests: Sequence[str]) -> None:
        videos = [str(video) for video in conversation.videos]
        key = json.dumps([conversation.messages, list(image_digests), videos], sort_keys=True)
        first = self.first_places.setdefault(hashlib.sha256(key.encode()).hexdigest(), conversation.source)
        if first != conversation.source:
            data_file, record = _split_source(conversation.source)
            self.warnings.append(
                Problem(
                    data_file,
                    "duplicate-sample",
                    f"same conversation and images as {first}",
                    "it trains twice as often; remove the copy unless that is intended",
                    record,
                )
            )


def duplicate_conversations(conversations: Iterable[Conversation]) -> list[Problem]:
    """`duplicate-sample` warnings for a dataset whose images were already checked (training's gate)."""
    duplicates = DuplicateConversations()
    digests: dict[Path, str] = {}
    for conversation in conversations:
        for image in conversation.images:
            if image not in digests:
                digests[image] = hashlib.sha256(image.read_bytes()).hexdigest()
        duplicates.note(conversation, [digests[image] for image in conversation.images])
    return duplicates.warnings


def token_length_histogram(lengths: Sequence[int], max_length: int) -> str:
    """Samples per token-length range (powers of two), with the count of samples over `max_length`."""
    bins = Counter(_power_of_two_ceiling(length) for length in lengths)
    widest = max(bins.values())
    lines = [f"{'tokens':>11}  {'samples':>7}"]
    for upper in sorted(bins):
        lower = upper // 2 + 1 if upper > 1 else 0
        bar = "#" * max(1, round(30 * bins[upper] / widest))
        lines.append(f"{f'{lower}-{upper}':>11}  {bins[upper]:>7}  {bar}")
    over = sum(length > max_length for length in lengths)
    lines.append(
        f"{'total':>11}  {len(lengths):>7}  ({over} over max_length {max_length}, see data.overlength)"
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class _ImageFacts:
    """An image that decodes: its upright size and a hash of its bytes (to find duplicates)."""

    width: int
    height: int
    digest: str


def _inspect_video(
    source: VideoSource, sampling: VideoSampling, processor: Any
) -> tuple[int, int | None] | Problem:
    """(frames sampled, tokens with `processor` or None) of a video, or what is wrong with it."""
    temporal_patch = processor.video_processor.temporal_patch_size if processor is not None else 2
    problem = video_problem(source, sampling, temporal_patch)
    if problem is not None:
        return problem
    plan = plan_frames(probe_video(source, sampling.fps), sampling, temporal_patch)
    tokens = video_tokens(processor, plan)[0] if processor is not None else None
    return len(plan.indices), tokens


def _inspect(image: Path, max_pixels: int, min_side: int) -> _ImageFacts | Problem:
    """Decode `image` as training will; when it is usable, its upright size and content hash."""
    problem = inspect_image(image, max_pixels=max_pixels, min_side=min_side)
    if problem is not None:
        return problem
    width, height = upright_size(image)
    if max(width, height) / min(width, height) > QWENVL_MAX_ASPECT:
        return Problem(
            str(image),
            "extreme-aspect",
            f"image is {width}x{height}, an aspect ratio over {QWENVL_MAX_ASPECT}:1 (Qwen-VL refuses it)",
            "crop it, or cut it into several images",
        )
    return _ImageFacts(width, height, hashlib.sha256(image.read_bytes()).hexdigest())


def _encoded(image: Path | DatasetRow) -> Path | bytes:
    return image if isinstance(image, Path) else image.read()


def _counts(problems: Iterable[Problem]) -> dict[str, int]:
    counts = Counter(problem.kind for problem in problems)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _in_file_order(problems: Iterable[Problem]) -> list[Problem]:
    """Problems by file and record: a file's problems read top to bottom, whichever check found them."""
    return sorted(problems, key=lambda problem: (problem.file, problem.record or 0))


def _split_source(source: str) -> tuple[str, int | None]:
    """`"data.jsonl:3"` -> `("data.jsonl", 3)`: the record number follows the last colon."""
    file, _, record = source.rpartition(":")
    return (file, int(record)) if file and record.isdigit() else (source, None)


def _text_words(messages: Iterable[dict]) -> int:
    return sum(
        len(part["text"].split())
        for message in messages
        for part in message["content"]
        if part["type"] == "text"
    )


def _power_of_two_ceiling(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def _image_stats(sizes: Sequence[tuple[int, int]]) -> dict:
    return {
        "width": _spread([width for width, _ in sizes]),
        "height": _spread([height for _, height in sizes]),
        "aspect": _spread([width / height for width, height in sizes]),
    }


def _spread(values: Sequence[float]) -> dict | None:
    """min / median / max of `values` (None when there are none), rounded for reading."""
    if not values:
        return None
    return {
        name: _round(value)
        for name, value in (("min", min(values)), ("median", statistics.median(values)), ("max", max(values)))
    }


def _round(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 2)


def _format_stats(stats: dict) -> list[str]:
    lines = []
    for key, value in stats.items():
        if value is None:
            continue
        label = f"{_STAT_LABELS.get(key, key.replace('_', ' '))}:"
        if isinstance(value, dict):
            value = f"min {value['min']}, median {value['median']}, max {value['max']}"
        lines.append(f"  {label:<24}{value}")
    return lines
