"""Loss masks for SDXL (`data.masked_loss`): which pixels of each image train, and how much.

A mask is a greyscale picture the size of its image. WHITE (255) TRAINS, BLACK (0) IS IGNORED, and grey
value v weighs the loss of its pixels by v/255. (sd-scripts shipped the inverse once, #1172; the tests
pin this orientation.) A colour mask file is read as its grey value (Pillow's `convert("L")`), and the
transparent parts of a mask file count as black.

Where a sample's mask comes from; the first that exists wins:

1. `mask_dir/<image name>.<any image extension>`, when a mask folder is given (`data.mask_dir`); a
   mask folder that mirrors the dataset's subfolders is matched by them first
   (`mask_dir/10_sks/cat.png` for `data/10_sks/cat.jpg`), so same-named images in different subfolders
   get their own masks;
2. `masks/<image name>.<any image extension>` in the image's own folder;
3. the image's alpha channel, when it has one that is not fully opaque (the image itself trains
   composited onto `data.background`, as it does without masks);
4. none: the whole image trains, exactly as without masked loss.

Masks are matched by the image's file name without its extension (and, in `mask_dir`, its folders).
Rows of a Hugging Face dataset have no file name to match, so their masks come only from their alpha
channel.

A mask whose size differs from its image's, one that is black everywhere (nothing would train) and one
that cannot be read are problems, reported like any other data problem (`tuner data check`, and the
run refuses them unless `data.skip_bad`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from tuner.data.captions import ALPHA_MASK, MASK_FOLDER, CaptionedImage, DatasetRow
from tuner.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, UnusableImage, load_alpha, load_image_rgb
from tuner.data.problems import Problem
from tuner.errors import DataError


@dataclass(frozen=True)
class MaskCounts:
    """How many images have a mask file, an alpha-channel mask, or no mask (they train everywhere)."""

    files: int
    alpha: int
    none: int

    def __str__(self) -> str:
        return (
            f"masks: {self.files} from mask files, {self.alpha} from alpha channels, "
            f"{self.none} without a mask (trained on the whole image)"
        )

    def to_json(self) -> dict[str, int]:
        return {"files": self.files, "alpha": self.alpha, "none": self.none}


@dataclass
class MaskScan:
    """The samples with their `mask` set (those with a mask problem left out) and the problems."""

    samples: list[CaptionedImage]
    problems: list[Problem]

    @property
    def counts(self) -> MaskCounts:
        return mask_counts(self.samples)


def find_masks(
    samples: Sequence[CaptionedImage],
    mask_dir: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> MaskScan:
    """Find, read and check each sample's mask (see the module docstring for where masks come from)."""
    folders = _MaskFolders(Path(mask_dir).expanduser() if mask_dir else None)
    found: list[CaptionedImage] = []
    problems: list[Problem] = []
    for sample in samples:
        try:
            mask = _find_mask(sample, folders, max_pixels)
        except _MaskProblem as error:
            problems.append(error.problem)
            continue
        found.append(replace(sample, mask=mask))
    return MaskScan(found, problems)


def mask_counts(samples: Sequence[CaptionedImage]) -> MaskCounts:
    """How many distinct images (a repeated image counts once) have each kind of mask."""
    kinds = {_image_id(sample): sample.mask for sample in samples}
    alpha = sum(mask == ALPHA_MASK for mask in kinds.values())
    none = sum(mask is None for mask in kinds.values())
    return MaskCounts(files=len(kinds) - alpha - none, alpha=alpha, none=none)


def load_mask(sample: CaptionedImage, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The sample's mask as an upright 8-bit greyscale ("L") image, 255 = trained; `sample.mask` must be
    set. Raises `DataError` when the mask cannot be read (or the image lost its alpha channel)."""
    if isinstance(sample.mask, Path):
        # Black under transparency: a transparent part of a mask file is not trained.
        return load_image_rgb(sample.mask, background=(0, 0, 0), max_pixels=max_pixels).convert("L")
    if sample.mask != ALPHA_MASK:
        raise ValueError(f"sample {sample.source} has no mask")
    alpha = load_alpha(_encoded(sample.image), _image_name(sample), max_pixels)
    if alpha is None:
        raise DataError(
            f"{_image_name(sample)}: the image has no alpha channel any more, but it was its mask",
            hint="restore the image with its transparency, or start the run again to look for masks anew",
        )
    return alpha


class _MaskProblem(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


class _MaskFolders:
    """Mask files by image name in the mask folder and in each `masks/` folder, each folder listed once."""

    def __init__(self, mask_dir: Path | None) -> None:
        if mask_dir is not None and not mask_dir.is_dir():
            raise DataError(
                f"mask folder {mask_dir} does not exist",
                hint="check data.mask_dir (--mask-dir), or leave it out to use masks/ beside the images",
            )
        self.mask_dir = mask_dir
        self._listings: dict[Path, dict[str, list[Path]]] = {}

    def candidates(self, image: Path) -> list[Path]:
        """The mask files named like `image`, from the first folder that has any."""
        folders = []
        if self.mask_dir is not None:
            # The deepest mirror of the image's folders first: data/10_sks/cat.png -> mask_dir/10_sks/.
            parents = image.parent.relative_to(image.parent.anchor).parts
            folders = [self.mask_dir.joinpath(*parents[start:]) for start in range(len(parents) + 1)]
        for folder in [*folders, image.parent / MASK_FOLDER]:
            files = self._listing(folder).get(image.stem, [])
            if files:
                return files
        return []

    def _listing(self, folder: Path) -> dict[str, list[Path]]:
        if folder not in self._listings:
            listing: dict[str, list[Path]] = {}
            if folder.is_dir():
                for file in sorted(folder.iterdir()):
                    if file.suffix.lower() in IMAGE_EXTENSIONS and not file.name.startswith("."):
                        listing.setdefault(file.stem, []).append(file)
            self._listings[folder] = listing
        return self._listings[folder]


def _find_mask(sample: CaptionedImage, folders: _MaskFolders, max_pixels: int) -> Path | str | None:
    if isinstance(sample.image, Path):
        files = folders.candidates(sample.image)
        if len(files) > 1:
            raise _MaskProblem(
                Problem(
                    str(files[0].parent),
                    "ambiguous-mask",
                    f"{len(files)} mask files for {sample.image.name}: {', '.join(f.name for f in files)}",
                    "keep one mask per image",
                )
            )
        if files:
            _check_mask_file(sample, files[0], max_pixels)
            return files[0]
    try:
        alpha = load_alpha(_encoded(sample.image), _image_name(sample), max_pixels)
    except UnusableImage as error:  # the scan decoded it a moment ago: changed since
        raise _MaskProblem(error.problem) from None
    if alpha is None or _lowest(alpha) == 255:
        return None  # many images carry an alpha channel that hides nothing
    if _highest(alpha) == 0:
        raise _MaskProblem(
            _sample_problem(
                sample,
                "empty-mask",
                "the image is fully transparent, and its alpha channel is its mask: nothing would train",
                "make the subject opaque, or give the image a mask file",
            )
        )
    return ALPHA_MASK


def _check_mask_file(sample: CaptionedImage, mask_file: Path, max_pixels: int) -> None:
    image_name = _image_name(sample)
    try:
        mask = load_mask(replace(sample, mask=mask_file), max_pixels)
    except UnusableImage as error:
        what = f"mask of {image_name} cannot be used: {error.problem.what}"
        raise _MaskProblem(Problem(str(mask_file), "unreadable-mask", what, error.problem.fix)) from None
    size = sample.load(max_pixels=max_pixels).size
    if mask.size != size:
        raise _MaskProblem(
            Problem(
                str(mask_file),
                "mask-size",
                f"mask is {mask.width}x{mask.height}, but its image {image_name} is {size[0]}x{size[1]}",
                "save the mask at its image's size (after EXIF rotation), e.g. by exporting it from the "
                "same canvas",
            )
        )
    if _highest(mask) == 0:
        raise _MaskProblem(
            Problem(
                str(mask_file),
                "empty-mask",
                f"mask of {image_name} is black everywhere: nothing of the image would train",
                "paint the trained part white (black is ignored), or delete the mask",
            )
        )


def _lowest(image: Image.Image) -> int:
    return int(np.asarray(image).min())


def _highest(image: Image.Image) -> int:
    return int(np.asarray(image).max())


def _sample_problem(sample: CaptionedImage, kind: str, what: str, fix: str) -> Problem:
    if isinstance(sample.image, DatasetRow):
        return Problem(sample.image.dataset, kind, what, fix, sample.image.row + 1)
    return Problem(str(sample.image), kind, what, fix)


def _encoded(image: Path | DatasetRow) -> Path | bytes:
    return image if isinstance(image, Path) else image.read()


def _image_name(sample: CaptionedImage) -> str:
    return str(sample.image) if isinstance(sample.image, Path) else sample.source


def _image_id(sample: CaptionedImage) -> str:
    image = sample.image
    return str(image) if isinstance(image, Path) else f"{image.dataset}:{image.split}:{image.row}"
