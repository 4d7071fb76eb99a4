"""Captioned-image datasets for SDXL: find every (image, caption) pair and every problem, in one pass.

Three layouts are recognised:

- `folder-txt` (kohya style): images with a same-name `.txt` caption beside them, nested folders allowed.
- `metadata-jsonl` / `metadata-csv` (the `datasets` imagefolder layout): a `metadata.jsonl` or
  `metadata.csv` at the top of the folder with a `file_name` (relative to the folder) and a caption column.
- `hf-dataset`: a folder written by `save_to_disk`, a local folder `datasets.load_dataset` reads
  (parquet/arrow files), or a dataset name, with an image column and a caption column.

Scanning never stops at the first bad sample: `CaptionScan.samples` holds the usable samples and
`CaptionScan.problems` one `Problem` for each sample left out (and each caption file without an image);
`CaptionScan.warnings` lists what trains but may be a mistake (an image whose content another has).
Images are not decoded unless `check_images=True`; they are read only to hash them for duplicates.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from PIL import Image

from tuner.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    decode_image_rgb,
    inspect_image,
    inspect_image_bytes,
    load_image_rgb,
)
from tuner.data.problems import Problem
from tuner.errors import DataError

METADATA_IMAGE_KEY = "file_name"
# CaptionedImage.mask of an image whose alpha channel is its mask.
ALPHA_MASK = "alpha"
# The folder beside a set of images that holds their loss masks (never scanned for training images).
MASK_FOLDER = "masks"
_DATASET_FILE_SUFFIXES = frozenset({".parquet", ".arrow"})
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# kohya's folder convention: `10_sks dog/` trains its images 10 times per epoch; "sks dog" captions an
# image of it that has no caption file.
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class DatasetRow:
    """An image stored in row `row` (0-based) of a Hugging Face dataset, read only when loaded."""

    dataset: str  # absolute folder path, or a dataset name for `datasets.load_dataset`
    split: str | None
    row: int
    column: str
    saved_to_disk: bool  # True: `load_from_disk(dataset)`; False: `load_dataset(dataset)`

    def read(self) -> bytes | Path:
        """The encoded image bytes, or the path of the file the dataset points to."""
        dataset = _open_hf_dataset(self.dataset, self.saved_to_disk, self.split, self.column)
        value = dataset[self.row][self.column]
        return _encoded_image(value, f"{self.dataset}:{self.row + 1}")


@dataclass(frozen=True)
class CaptionedImage:
    """One training sample. `image` is a file (absolute path) or a row of a Hugging Face dataset;
    call `load()` for the pixels either way. `source` says where the sample came from for messages:
    the caption file, `metadata.jsonl:LINE`, or `DATASET:RECORD` (1-based)."""

    image: Path | DatasetRow
    caption: str
    source: str
    # The loss mask (data.masked_loss): a mask image file, ALPHA_MASK (the image's own alpha channel),
    # or None (every pixel trains).
    mask: Path | str | None = None
    # A regularisation (class) image: its loss is the prior loss.
    prior: bool = False
    # Its source's own caption prefix (`data.sources[].caption_prefix`; "" for a class image without one),
    # or None for the run's trigger word: see `caption_prefix_of`.
    caption_prefix: str | None = None

    def load(
        self, background: tuple[int, int, int] = (255, 255, 255), max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> Image.Image:
        """The image as upright 8-bit RGB (see `load_image_rgb`); raises `DataError` for a bad image."""
        if isinstance(self.image, Path):
            return load_image_rgb(self.image, background, max_pixels)
        encoded = self.image.read()
        if isinstance(encoded, Path):
            return load_image_rgb(encoded, background, max_pixels)
        return decode_image_rgb(encoded, self.source, background, max_pixels)


@dataclass
class CaptionScan:
    samples: list[CaptionedImage]
    problems: list[Problem]
    layout: str  # "folder-txt", "metadata-jsonl", "metadata-csv" or "hf-dataset"
    # Trainable but worth a look: an image whose content another sample already has (it stays in
    # `samples`, so it trains twice as often, as kohya and diffusers would train it).
    warnings: list[Problem] = field(default_factory=list)
    # The scanned folder (None for a dataset name); the kohya `N_words/` folders under it are found
    # with `kohya_folder_of`.
    root: Path | None = None
    # Images without a caption file that got one anyway: where the caption came from -> how many
    # (`folder NAME` for kohya's folder rule, `class prompt` for data.class_prompt).
    filled_captions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class KohyaFolder:
    """A folder named `N_words` (kohya's convention): N repeats per epoch, and the class/identifier words."""

    repeats: int
    words: str


def parse_kohya_folder(name: str) -> KohyaFolder | None:
    """`"10_sks dog"` -> KohyaFolder(10, "sks dog"); None for names that are not `N_words` with N >= 1."""
    match = _KOHYA_FOLDER.match(name)
    if match is None or int(match.group(1)) < 1:
        return None
    return KohyaFolder(int(match.group(1)), match.group(2).strip())


def kohya_folder_of(image: Path, root: Path) -> Path | None:
    """The innermost `N_words` folder between `root` (not itself: it is the dataset, not a subset) and
    `image`, or None."""
    for folder in image.parents:
        if folder == root or not folder.is_relative_to(root):
            return None
        if parse_kohya_folder(folder.name) is not None:
            return folder
    return None


def scan_caption_dataset(
    path: str | Path,
    image_column: str = "image",
    caption_column: str = "text",
    *,
    check_images: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 0,
    class_prompt: str | None = None,
) -> CaptionScan:
    """Find the samples and problems of the dataset at `path` (a folder, or a dataset name).

    In a folder-txt dataset an image without a caption file is captioned with its kohya folder's words
    (`10_sks dog/` -> "sks dog"), else with `class_prompt` when given, else it is a problem; the scan
    counts such captions in `filled_captions`.

    `check_images=True` also decodes every image (`inspect_image`), reporting unreadable, oversized
    (`max_pixels`) and undersized (`min_side`) ones. Samples are in sorted path order (row order for a
    Hugging Face dataset). Raises `DataError` when `path` is neither a folder nor a loadable dataset,
    or holds no images at all.
    """
    images = _ImageChecks(check_images, max_pixels, min_side)
    root = Path(path).expanduser()
    if not root.exists():
        if _HUB_NAME.match(str(path)) and not str(path).startswith("."):
            return _scan_hf_dataset(str(path), False, image_column, caption_column, images)
        raise DataError(f"dataset folder {root} does not exist", hint="check data.path")
    if not root.is_dir():
        raise DataError(
            f"{root} is a file, not a dataset folder",
            hint="point data.path at the folder that holds the images (and metadata.jsonl/csv, if any)",
        )
    root = root.resolve()
    if (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file():
        return _scan_hf_dataset(str(root), True, image_column, caption_column, images)
    jsonl, csv_file = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file() and csv_file.is_file():
        raise DataError(
            f"{root} has both metadata.jsonl and metadata.csv",
            hint="keep one of them so the captions are unambiguous",
        )
    if jsonl.is_file():
        return _scan_metadata(root, jsonl, "metadata-jsonl", caption_column, images)
    if csv_file.is_file():
        return _scan_metadata(root, csv_file, "metadata-csv", caption_column, images)
    image_files, caption_files, other_files = _walk(root)
    if image_files:
        scan = _scan_folder_txt(root, image_files, caption_files, images, class_prompt)
        scan.root = root
        return scan
    if any(file.suffix.lower() in _DATASET_FILE_SUFFIXES for file in other_files):
        return _scan_hf_dataset(str(root), False, image_column, caption_column, images)
    raise DataError(
        f"{root} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} in it and its subfolders)",
        hint="point data.path at the folder with your images and their .txt captions",
    )


def caption_prefix_of(sample: CaptionedImage, trigger: str) -> str:
    """The prefix `sample`'s caption trains with: its own (its source's), else the run's `trigger` word
    (`data.caption_prefix`)."""
    return trigger if sample.caption_prefix is None else sample.caption_prefix


def transform_caption(
    caption: str,
    *,
    prefix: str = "",
    shuffle_tags: bool = False,
    keep_tags: int = 0,
    dropout: float = 0.0,
    rng: random.Random,
) -> str:
    """The caption one training step sees.

    With probability `dropout` it is "" (the unconditional caption classifier-free guidance learns from).
    Otherwise the comma-separated tags after the first `keep_tags` are shuffled, and `prefix` (a trigger
    word) is put in front as "prefix, caption"; the prefix never takes part in the shuffle.
    """
    if dropout > 0 and rng.random() < dropout:
        return ""
    if shuffle_tags:
        tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
        kept, shuffled = tags[:keep_tags], tags[keep_tags:]
        rng.shuffle(shuffled)
        caption = ", ".join(kept + shuffled)
    if not prefix:
        return caption
    return f"{prefix}, {caption}" if caption else prefix


@dataclass
class _ImageChecks:
    """Per-image checks shared by every layout: duplicate content (always, a warning) and decoding (on
    request, a problem)."""

    decode: bool
    max_pixels: int
    min_side: int
    first_seen: dict[str, str] = field(default_factory=dict)
    warnings: list[Problem] = field(default_factory=list)

    def note_duplicate(self, data: bytes, name: str, report_file: str, record: int | None) -> None:
        """Warn when identical bytes were seen before (else remember `name` as their first place)."""
        digest = hashlib.sha256(data).hexdigest()
        first = self.first_seen.setdefault(digest, name)
        if first != name:
            self.warnings.append(
                Problem(
                    report_file,
                    "duplicate-image",
                    f"image {name} has the same content as {first}",
                    "it trains twice as often; remove one copy unless that is intended",
                    record,
                )
            )

    def inspect(self, image: Path | bytes, name: str) -> Problem | None:
        if not self.decode:
            return None
        if isinstance(image, Path):
            return inspect_image(image, self.max_pixels, self.min_side)
        return inspect_image_bytes(image, name, self.max_pixels, self.min_side)


def _walk(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Images, .txt files and other files under `root`, sorted.

    Hidden files and folders are skipped: macOS `._name.jpg` resource forks and `.ipynb_checkpoints`
    carry image extensions without being images. So are `masks/` folders: they hold the loss masks of
    the images beside them (`tuner.data.masks`), not training images. Symlinked folders are not
    followed (no loops).
    """
    images, captions, others = [], [], []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".") and name != MASK_FOLDER]
        for name in files:
            if name.startswith("."):
                continue
            file = Path(folder) / name
            suffix = file.suffix.lower()
            (images if suffix in IMAGE_EXTENSIONS else captions if suffix == ".txt" else others).append(file)
    return sorted(images), sorted(captions), sorted(others)


def _scan_folder_txt(
    root: Path,
    image_files: list[Path],
    caption_files: list[Path],
    checks: _ImageChecks,
    class_prompt: str | None,
) -> CaptionScan:
    captions_by_stem = {file.with_suffix(""): file for file in caption_files}
    samples: list[CaptionedImage] = []
    problems: list[Problem] = []
    filled: dict[str, int] = {}
    for image in image_files:
        caption_file = captions_by_stem.get(image.with_suffix(""))
        origin = None  # where a caption without a caption file came from
        if caption_file is not None:
            caption, problem = _read_caption_file(caption_file)
            source = str(caption_file)
        elif (filled_from := _filled_caption(image, root, class_prompt)) is not None:
            (origin, caption), problem, source = filled_from, None, str(image)
        else:
            problems.append(
                Problem(
                    str(image),
                    "missing-caption",
                    f"no caption file {image.with_suffix('.txt').name} beside the image",
                    "write the caption into that .txt file, or remove the image",
                )
            )
            continue
        problem = problem or _check_file(image, str(image), None, str(image), checks)
        if problem is not None:
            problems.append(problem)
            continue
        if origin is not None:
            filled[origin] = filled.get(origin, 0) + 1
        samples.append(CaptionedImage(image=image, caption=caption, source=source))
    image_stems = {image.with_suffix("") for image in image_files}
    problems.extend(
        Problem(
            str(caption_file),
            "orphan-caption",
            "caption file without an image of the same name",
            "rename it to match its image, or remove it",
        )
        for caption_file in caption_files
        if caption_file.with_suffix("") not in image_stems
    )
    return CaptionScan(samples, problems, "folder-txt", checks.warnings, filled_captions=filled)


def _filled_caption(image: Path, root: Path, class_prompt: str | None) -> tuple[str, str] | None:
    """(where from, caption) for an image without a caption file: kohya's folder words, else the class
    prompt; None when neither applies (a missing caption is then a problem)."""
    folder = kohya_folder_of(image, root)
    words = parse_kohya_folder(folder.name).words if folder is not None else ""
    if folder is not None and words:
        return f"folder {folder.name}", words
    if class_prompt:
        return "class prompt", class_prompt
    return None


def _read_caption_file(file: Path) -> tuple[str, Problem | None]:
    try:
        # utf-8-sig: captions written by Windows tools often start with a byte-order mark.
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return "", Problem(
            str(file), "unreadable-caption", "caption is not UTF-8 text", "save the file as UTF-8"
        )
    # Captions spread over several lines are one caption: join the lines instead of dropping any.
    caption = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if not caption:
        return "", Problem(
            str(file), "empty-caption", "caption file is empty", "write a caption or remove the image"
        )
    return caption, None


def _check_file(
    image: Path, name: str, record: int | None, report_file: str, checks: _ImageChecks
) -> Problem | None:
    if not image.is_file():
        return Problem(
            report_file,
            "missing-image",
            f"image {name} does not exist",
            "fix the name or add the image",
            record,
        )
    problem = checks.inspect(image, name)
    if problem is not None and record is not None:
        return Problem(report_file, problem.kind, f"{name}: {problem.what}", problem.fix, record)
    if problem is None:
        checks.note_duplicate(image.read_bytes(), name, report_file, record)
    return problem


def _scan_metadata(
    root: Path, metadata: Path, layout: str, caption_column: str, checks: _ImageChecks
) -> CaptionScan:
    records = _read_jsonl(metadata) if layout == "metadata-jsonl" else _read_csv(metadata)
    samples: list[tuple[str, int, CaptionedImage]] = []
    problems: list[Problem] = []
    seen_keys: set[str] = set()
    parsed = 0
    for line, record in records:
        if isinstance(record, Problem):
            problems.append(record)
            continue
        parsed += 1
        seen_keys.update(record)
        missing = [key for key in (METADATA_IMAGE_KEY, caption_column) if record.get(key) is None]
        if record.get(METADATA_IMAGE_KEY) == "":
            missing.insert(0, METADATA_IMAGE_KEY)
        if missing:
            problems.append(
                Problem(
                    str(metadata),
                    "missing-key",
                    f"record has no {' or '.join(repr(key) for key in missing)}",
                    f"add {', '.join(repr(key) for key in missing)} to this record",
                    line,
                )
            )
            continue
        file_name, caption = record[METADATA_IMAGE_KEY], record[caption_column]
        if not isinstance(file_name, str) or not isinstance(caption, str):
            problems.append(
                Problem(
                    str(metadata),
                    "malformed-line",
                    f"{METADATA_IMAGE_KEY!r} and {caption_column!r} must be text",
                    "write both as strings",
                    line,
                )
            )
            continue
        image = _inside(root, file_name)
        if image is None:
            problems.append(
                Problem(
                    str(metadata),
                    "path-escape",
                    f"{METADATA_IMAGE_KEY} {file_name!r} points outside {root}",
                    "copy the image into the dataset folder and use a relative path without '..'",
                    line,
                )
            )
            continue
        if not caption.strip():
            problems.append(
                Problem(
                    str(metadata),
                    "empty-caption",
                    f"caption of {file_name} is empty",
                    "write a caption",
                    line,
                )
            )
            continue
        sample = CaptionedImage(image=image, caption=caption.strip(), source=f"{metadata}:{line}")
        samples.append((file_name, line, sample))
    if parsed and caption_column not in seen_keys:
        raise _missing_column(metadata, caption_column, seen_keys, "data.caption_column")
    if parsed and METADATA_IMAGE_KEY not in seen_keys:
        raise _missing_column(metadata, METADATA_IMAGE_KEY, seen_keys, f"a {METADATA_IMAGE_KEY!r} key")
    if not parsed and not problems:
        raise DataError(f"{metadata} lists no images", hint="add one record per image, or remove the file")
    kept = []
    for file_name, line, sample in sorted(samples, key=lambda item: str(item[2].image)):
        problem = _check_file(root / file_name, file_name, line, str(metadata), checks)
        if problem is None:
            kept.append(sample)
        else:
            problems.append(problem)
    return CaptionScan(kept, problems, layout, checks.warnings)


def _missing_column(metadata: Path, column: str, seen: set[str], setting: str) -> DataError:
    return DataError(
        f"{metadata} has no {column!r} in any record (it has: {', '.join(sorted(seen)) or 'nothing'})",
        hint=f"set {setting} to the column that holds it"
        if setting.startswith("data.")
        else f"add {setting}",
    )


def _read_jsonl(metadata: Path) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    with metadata.open(encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, _malformed(metadata, number, f"not valid JSON ({error.msg})")
                continue
            if not isinstance(record, dict):
                yield number, _malformed(metadata, number, "not a JSON object")
                continue
            yield number, record


def _read_csv(metadata: Path) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    with metadata.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        for record in reader:
            # csv puts surplus cells under the key None; a short row gets None values (missing keys).
            if None in record:
                yield (
                    reader.line_num,
                    _malformed(metadata, reader.line_num, "more cells than the header has columns"),
                )
                continue
            yield reader.line_num, {key: value for key, value in record.items() if value is not None}


def _malformed(metadata: Path, line: int, what: str) -> Problem:
    return Problem(str(metadata), "malformed-line", f"line is {what}", "fix or remove the line", line)


def _inside(root: Path, file_name: str) -> Path | None:
    """`root / file_name`, or None when the name or a symlink on the way leads outside `root`."""
    relative = PurePosixPath(file_name.replace("\\", "/"))
    if relative.is_absolute() or PureWindowsPath(file_name).drive or ".." in relative.parts:
        return None
    image = root / relative
    return image if image.resolve().is_relative_to(root) else None


def _scan_hf_dataset(
    source: str, saved_to_disk: bool, image_column: str, caption_column: str, checks: _ImageChecks
) -> CaptionScan:
    split = _pick_split(source, saved_to_disk)
    dataset = _open_hf_dataset(source, saved_to_disk, split, image_column)
    for column, setting in ((image_column, "data.image_column"), (caption_column, "data.caption_column")):
        if column not in dataset.column_names:
            raise DataError(
                f"dataset {source} has no column {column!r} (it has: {', '.join(dataset.column_names)})",
                hint=f"set {setting} to the column that holds it",
            )
    if len(dataset) == 0:
        raise DataError(f"dataset {source} has no rows", hint="check data.path")
    samples: list[CaptionedImage] = []
    problems: list[Problem] = []
    columns = dataset.select_columns([image_column, caption_column])
    for start, batch in zip(range(0, len(dataset), 256), columns.iter(batch_size=256), strict=True):
        for offset, (value, caption) in enumerate(
            zip(batch[image_column], batch[caption_column], strict=True)
        ):
            row = start + offset
            name = f"{source}:{row + 1}"
            problem = _check_hf_row(value, caption, name, source, row + 1, checks)
            if problem is not None:
                problems.append(problem)
                continue
            image = DatasetRow(source, split, row, image_column, saved_to_disk)
            samples.append(CaptionedImage(image=image, caption=caption.strip(), source=name))
    return CaptionScan(samples, problems, "hf-dataset", checks.warnings)


def _check_hf_row(
    value: Any, caption: Any, name: str, source: str, record: int, checks: _ImageChecks
) -> Problem | None:
    if caption is not None and not isinstance(caption, str):
        kind = type(caption).__name__
        return Problem(
            source, "malformed-line", f"caption is a {kind}, not text", "store one caption string", record
        )
    if not caption or not caption.strip():
        return Problem(source, "empty-caption", "caption is empty", "write a caption or drop the row", record)
    try:
        encoded = _encoded_image(value, name)
    except DataError as error:
        return Problem(source, "missing-image", error.message, error.hint or "", record)
    if isinstance(encoded, Path):
        return _check_file(encoded, str(encoded), record, source, checks)
    problem = checks.inspect(encoded, name)
    if problem is not None:
        return Problem(source, problem.kind, problem.what, problem.fix, record)
    checks.note_duplicate(encoded, name, source, record)
    return None


def _encoded_image(value: Any, name: str) -> bytes | Path:
    """The bytes (or file path) behind one image cell: an undecoded `Image` feature, bytes, or a path."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value:
        return Path(value)
    raise DataError(f"{name}: no image in this row", hint="fill the image column or drop the row")


def _pick_split(source: str, saved_to_disk: bool) -> str | None:
    """ "train" when the dataset has splits (or its only split), None for a single saved `Dataset`."""
    import datasets

    try:
        if saved_to_disk:
            loaded = datasets.load_from_disk(source)
            splits = list(loaded) if isinstance(loaded, datasets.DatasetDict) else None
        else:
            splits = list(datasets.get_dataset_split_names(source))
    except (OSError, ValueError) as error:
        where = "dataset" if saved_to_disk or Path(source).exists() else "no folder by that name, and dataset"
        raise DataError(
            f"cannot load {where} {source}: {error}",
            hint="data.path must be an image folder, a save_to_disk folder or a dataset name",
        ) from None
    if splits is None:
        return None
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise DataError(
        f"dataset {source} has no 'train' split (it has: {', '.join(splits)})",
        hint="save the split to train on with save_to_disk and point data.path at it",
    )


@functools.lru_cache(maxsize=4)
def _open_hf_dataset(source: str, saved_to_disk: bool, split: str | None, image_column: str) -> Any:
    """The dataset with its image column left undecoded, opened once per process (Arrow memory-maps it,
    so holding it costs no RAM; DataLoader workers each open their own)."""
    import datasets

    if saved_to_disk:
        dataset = datasets.load_from_disk(source)
        dataset = dataset[split] if split is not None else dataset
    else:
        dataset = datasets.load_dataset(source, split=split)
    feature = dataset.features.get(image_column)
    if isinstance(feature, datasets.Image):
        # decode=False hands back the stored bytes, so our loader applies EXIF, mode and size rules.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def tag_frequency(samples: list[CaptionedImage]) -> dict[str, dict[str, int]]:
    """{folder: {tag: count}} over the captions' comma-separated tags, as kohya's `ss_tag_frequency`
    records them (the folder is the image's; a Hugging Face dataset's rows count under `dataset`)."""
    frequency: dict[str, dict[str, int]] = {}
    for sample in samples:
        folder = sample.image.parent.name if isinstance(sample.image, Path) else "dataset"
        counts = frequency.setdefault(folder, {})
        for tag in filter(None, (part.strip() for part in sample.caption.split(","))):
            counts[tag] = counts.get(tag, 0) + 1
    return frequency
