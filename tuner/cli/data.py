"""`tuner data check`: list every problem in a dataset before training does, and summarise it."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import typer

from tuner.errors import ConfigError, ModelError

T = TypeVar("T")

data_app = typer.Typer(help="Check datasets before training on them.", no_args_is_help=True)


class DatasetKind(StrEnum):
    sdxl = "sdxl"
    qwenvl = "qwenvl"


@data_app.command("check")
def check_command(
    kind: Annotated[DatasetKind, typer.Argument(help="sdxl (captioned images) or qwenvl (conversations).")],
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Dataset folder or file (or a dataset name, for sdxl). sdxl: PATH@N for N repeats, and "
            "several PATHs check the mix that training with `--data` given for each would use.",
            metavar="PATH...",
        ),
    ],
    image_root: Annotated[
        str | None, typer.Option("--image-root", help="qwenvl: folder image paths are relative to.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    min_size: Annotated[
        int | None,
        typer.Option("--min-size", help="Smallest short side in px (default: 64 for sdxl, 28 for qwenvl)."),
    ] = None,
    max_image_pixels: Annotated[
        int | None, typer.Option("--max-image-pixels", help="Refuse images with more pixels (bombs).")
    ] = None,
    image_column: Annotated[
        str | None, typer.Option("--image-column", help="sdxl: image column of a HF/metadata dataset.")
    ] = None,
    caption_column: Annotated[
        str | None, typer.Option("--caption-column", help="sdxl: caption column of a HF/metadata dataset.")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option("--resolution", help="sdxl: training side length in px (sets buckets).")
    ] = None,
    bucket_step: Annotated[
        int | None, typer.Option("--bucket-step", help="sdxl: bucket size step in px.")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="sdxl: batch size (flags buckets that cannot fill one)."),
    ] = None,
    masked_loss: Annotated[
        bool,
        typer.Option("--masked-loss", help="sdxl: find and check each image's loss mask (size, all black)."),
    ] = False,
    mask_dir: Annotated[
        str | None, typer.Option("--mask-dir", help="sdxl: folder of masks named like their images.")
    ] = None,
    reg_data: Annotated[
        list[str] | None,
        typer.Option("--reg-data", help="sdxl: regularisation (class) images, as training mixes them."),
    ] = None,
    class_prompt: Annotated[
        str | None, typer.Option("--class-prompt", help="sdxl: caption of a --reg-data image without one.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Model whose tokenizer (sdxl: caption tokens cut, none without it) or processor (qwenvl, "
            "default `tiny`) counts tokens; `tiny` for the built-in.",
        ),
    ] = None,
    max_caption_tokens: Annotated[
        int | None,
        typer.Option("--max-caption-tokens", help="sdxl: caption tokens trained (75, 150 or 225)."),
    ] = None,
    max_pixels: Annotated[
        int | None, typer.Option("--max-pixels", help="qwenvl: upper bound of pixels per image.")
    ] = None,
    min_pixels: Annotated[
        int | None, typer.Option("--min-pixels", help="qwenvl: lower bound of pixels per image.")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="qwenvl: longest sample in tokens.")
    ] = None,
    video_fps: Annotated[
        float | None, typer.Option("--video-fps", help="qwenvl: video frames sampled per second.")
    ] = None,
    video_max_frames: Annotated[
        int | None, typer.Option("--video-max-frames", help="qwenvl: most frames sampled per video.")
    ] = None,
    video_max_pixels: Annotated[
        int | None, typer.Option("--video-max-pixels", help="qwenvl: pixels of all frames of a video.")
    ] = None,
) -> None:
    """Read the whole dataset the way training would and list EVERY problem, then a summary.

    Exits 0 when the dataset is clean and 1 when it has problems. Unset options take training's defaults.
    """
    from tuner.config.schema import DataConfig, TrainConfig
    from tuner.data.check import QWENVL_MIN_SIZE, SDXL_MIN_SIZE, check_qwenvl_dataset, check_sdxl_dataset
    from tuner.data.mixing import parse_data_flag
    from tuner.data.video import VideoSampling

    data = DataConfig()
    if kind is DatasetKind.sdxl:
        _refuse_options(
            "qwenvl",
            image_root=image_root,
            max_pixels=max_pixels,
            min_pixels=min_pixels,
            max_length=max_length,
            video_fps=video_fps,
            video_max_frames=video_max_frames,
            video_max_pixels=video_max_pixels,
        )
        first, *more = [parse_data_flag(path, "PATH") for path in paths]
        more += [parse_data_flag(value, "--reg-data", reg=True) for value in reg_data or []]
        report = check_sdxl_dataset(
            first.path,
            repeats=first.repeats,
            more_sources=more,
            class_prompt=class_prompt,
            image_column=_default(image_column, data.image_column),
            caption_column=_default(caption_column, data.caption_column),
            resolution=_default(resolution, data.resolution),
            bucket_step=_default(bucket_step, data.bucket_step),
            batch_size=_default(batch_size, TrainConfig().batch_size),
            min_size=_default(min_size, SDXL_MIN_SIZE),
            max_image_pixels=_default(max_image_pixels, data.max_image_pixels),
            # A mask folder says masks are wanted.
            masked_loss=masked_loss or mask_dir is not None,
            mask_dir=mask_dir,
            count_caption_tokens=_caption_token_counter(model) if model else None,
            max_caption_tokens=_max_caption_tokens(max_caption_tokens),
        )
    else:
        _refuse_options(
            "sdxl",
            image_column=image_column,
            caption_column=caption_column,
            resolution=resolution,
            bucket_step=bucket_step,
            batch_size=batch_size,
            masked_loss=masked_loss or None,
            mask_dir=mask_dir,
            reg_data=reg_data,
            class_prompt=class_prompt,
            max_caption_tokens=max_caption_tokens,
        )
        if len(paths) > 1:
            raise ConfigError(
                f"qwenvl checks one conversations file at a time; got {len(paths)}: {' '.join(paths)}",
                hint="run `tuner data check qwenvl FILE` for each file",
            )
        min_pixels, max_pixels = _default(min_pixels, data.min_pixels), _default(max_pixels, data.max_pixels)
        report = check_qwenvl_dataset(
            paths[0],
            image_root=image_root,
            processor=_load_processor(model or "tiny", min_pixels, max_pixels),
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            max_image_pixels=_default(max_image_pixels, data.max_image_pixels),
            min_size=_default(min_size, QWENVL_MIN_SIZE),
            max_length=_default(max_length, data.max_length),
            video=VideoSampling(
                _default(video_fps, data.video_fps),
                data.video_min_frames,
                _default(video_max_frames, data.video_max_frames),
                _default(video_max_pixels, data.video_max_pixels),
                min_pixels,
                max_pixels,
            ),
        )
    print(json.dumps(report.to_json(), indent=2) if as_json else report.format_text())
    if report.problems:
        # Not typer.Exit: under main()'s standalone_mode=False, typer 0.29 returns its code, exiting 0.
        raise SystemExit(1)


def _default(value: T | None, default: T) -> T:
    return default if value is None else value


def _refuse_options(only_for: str, **values: Any) -> None:
    given = [f"--{name.replace('_', '-')}" for name, value in values.items() if value is not None]
    if given:
        raise typer.BadParameter(f"{', '.join(given)} only apply to {only_for} datasets")


def _max_caption_tokens(value: int | None) -> int:
    from tuner.config.schema import DataConfig

    try:  # the schema's own check (75, 150 or 225)
        return DataConfig(max_caption_tokens=value or DataConfig().max_caption_tokens).max_caption_tokens
    except ValueError:
        raise typer.BadParameter(f"--max-caption-tokens {value}: use 75, 150 or 225") from None


def _caption_token_counter(model: str) -> Callable[[str], int]:
    """How many tokens the SDXL model's first tokenizer makes of a caption (only the tokenizer loads)."""
    from transformers import CLIPTokenizer

    from tuner.models.sdxl import caption_token_count
    from tuner.tiny import build_tiny, resolve_tiny_alias

    tiny = resolve_tiny_alias(model, "sdxl-lora")
    try:
        folder = str(build_tiny(tiny)) if tiny else model
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot load the tokenizer of {model} to count caption tokens: {str(error).splitlines()[0]}",
            hint="pass a diffusers SDXL folder or reachable hub ID with --model (`tiny` works offline)",
        ) from None
    return functools.partial(caption_token_count, tokenizer)


def _load_processor(model: str, min_pixels: int, max_pixels: int) -> Any:
    """Only the processor: token counts need the tokenizer, chat template and image processor, not weights."""
    from transformers import AutoProcessor

    from tuner.tiny import build_tiny, resolve_tiny_alias

    tiny = resolve_tiny_alias(model, "qwenvl-lora")
    try:
        # The pixel bounds decide how many tokens an image becomes: the processor must use training's.
        return AutoProcessor.from_pretrained(
            str(build_tiny(tiny)) if tiny else model,
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        )
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot load the processor of {model} to count tokens: {str(error).splitlines()[0]}",
            hint="pass a local model folder or a reachable hub ID with --model (`tiny` works offline)",
        ) from None
