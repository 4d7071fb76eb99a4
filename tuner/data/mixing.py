"""Several SDXL image folders in one run: repeats per folder, fractional shares, regularisation images.

A run's data is a list of sources (`data.path` with `data.repeats`, then `data.sources`; on the command
line `--data PATH@N` and `--reg-data DIR`). Each source is split into *portions*, the images that train
alike: one per kohya `N_words/` subfolder (N repeats; kohya's convention) and one for the rest of the
source. A portion's repeats are its source's explicit `repeats`, else its folder's N, else 1; a
regularisation source without explicit repeats is *balanced*: its class samples per epoch equal the
instance samples per epoch (kohya's behaviour), its folders' N weighing them against each other.

Repeats become training samples in two parts (`expand_repeats`): the whole part is that many copies of
the sample in the training list (distinct indices, so each copy draws its own noise, flip and caption
dropout from (seed, epoch, index); the cache stores identical inputs once), and a fractional part is a
share of the portion's images in each bucket, taken in turns epoch by epoch by
`tuner.data.sampling.GroupedBatchSampler`. Every portion trains in the same buckets and batches: a batch
can hold instance and class samples side by side, each with its own crop and time ids.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from tuner.config.schema import DataSource
from tuner.data.buckets import CropPlan
from tuner.data.captions import CaptionedImage, CaptionScan, kohya_folder_of, parse_kohya_folder
from tuner.data.sampling import held_out_indices, share_count
from tuner.errors import ConfigError

T = TypeVar("T")
Bucket = tuple[int, int]  # (width, height)
# A fractional part below this is float noise of a balanced repeats (e.g. 2.0000000001), not a share.
_MIN_SHARE = 1e-6
# `--data PATH@N`: the repeats follow the last "@".
REPEATS_MARK = "@"


def parse_data_flag(value: str, flag: str = "--data", reg: bool = False) -> DataSource:
    """`PATH` or `PATH@N` (N repeats, a positive number; `style/@2`, `variety/@0.5`) as a data source.

    "@" is used because it appears in neither Windows drives (`C:\\`), hub dataset names (`user/name`)
    nor usual folder names; a path that exists as written is taken whole, even when it holds an "@".
    """
    if REPEATS_MARK not in value or Path(value).expanduser().exists():
        return DataSource(path=value, reg=reg)
    path, _, text = value.rpartition(REPEATS_MARK)
    try:
        repeats = float(text)
    except ValueError:
        repeats = math.nan
    if not path or not math.isfinite(repeats) or repeats <= 0:
        raise ConfigError(
            f"{flag} {value!r}: {text!r} after the last {REPEATS_MARK!r} is not a positive number of repeats",
            hint=f"write {flag} PATH{REPEATS_MARK}N with N > 0, e.g. style/{REPEATS_MARK}2 or "
            f"variety/{REPEATS_MARK}0.5 (or PATH alone for the folder's own repeats)",
        )
    return DataSource(path=path, repeats=repeats, reg=reg)


@dataclass(frozen=True)
class Portion:
    """Images of one source that train alike: a kohya `N_words` subfolder, or the rest of the source."""

    name: str  # the folder's name, as kohya's metadata names it (`ss_dataset_dirs`)
    source: str  # the source's path, as given
    reg: bool  # regularisation (class) images: their samples are `prior=True`
    samples: tuple[CaptionedImage, ...]
    repeats: float
    # Repeats to balance against the instance samples (a reg source without explicit repeats).
    balanced: bool = False


def split_portions(source: DataSource, scan: CaptionScan) -> list[Portion]:
    """The portions of one scanned source, in the scan's sample order; class samples marked `prior`, and
    each sample with the source's caption prefix (class images: none unless the source sets one)."""
    source_prefix = "" if source.reg and source.caption_prefix is None else source.caption_prefix
    by_name: dict[str, tuple[int, list[CaptionedImage]]] = {}
    for sample in scan.samples:
        folder = None
        if scan.root is not None and isinstance(sample.image, Path):
            folder = kohya_folder_of(sample.image, scan.root)
        kohya = parse_kohya_folder(folder.name) if folder is not None else None
        name = folder.name if folder is not None else (scan.root.name if scan.root else source.path)
        entry = by_name.setdefault(name, (kohya.repeats if kohya else 1, []))
        entry[1].append(replace(sample, prior=source.reg, caption_prefix=source_prefix))
    return [
        Portion(
            name=name,
            source=source.path,
            reg=source.reg,
            samples=tuple(samples),
            repeats=source.repeats if source.repeats is not None else folder_repeats,
            balanced=source.reg and source.repeats is None,
        )
        for name, (folder_repeats, samples) in by_name.items()
    ]


def hold_out_validation(
    portions: Sequence[Portion], fraction: float, seed: int
) -> tuple[list[Portion], list[CaptionedImage]]:
    """(portions without the held-out images, validation samples): a seeded `fraction` of the instance
    images, chosen before repeats, so no copy of a held-out image trains. Class images all train."""
    instance_count = sum(len(portion.samples) for portion in portions if not portion.reg)
    held_out = held_out_indices(instance_count, fraction, seed)
    kept: list[Portion] = []
    validation: list[CaptionedImage] = []
    position = 0
    for portion in portions:
        if portion.reg:
            kept.append(portion)
            continue
        training = []
        for sample in portion.samples:
            (validation if position in held_out else training).append(sample)
            position += 1
        if training:
            kept.append(replace(portion, samples=tuple(training)))
    return kept, validation


def balance_regularisation(portions: Sequence[Portion]) -> list[Portion]:
    """Portions with the repeats of balanced class portions set: together they give as many samples per
    epoch as the instance portions (their folder repeats weigh them against each other)."""
    balanced = [portion for portion in portions if portion.balanced]
    if not balanced:
        return list(portions)
    instance = sum(len(portion.samples) * portion.repeats for portion in portions if not portion.reg)
    if instance == 0:
        raise ConfigError(
            "every data source is a regularisation source: there are no instance images to train",
            hint="pass the images to learn with --data (data.path), the class images with --reg-data",
        )
    weight = sum(len(portion.samples) * portion.repeats for portion in balanced)
    return [
        replace(portion, repeats=portion.repeats * instance / weight) if portion.balanced else portion
        for portion in portions
    ]


def samples_per_bucket(portions: Sequence[Portion], buckets: Sequence[Bucket]) -> list[Counter[Bucket]]:
    """Per portion, bucket -> the samples it trains in each epoch; `buckets` holds each image's bucket,
    in portion order.

    A portion's whole repeats copy each image; a fractional part takes `share_count` of its images in a
    bucket. Balanced class portions together take exactly the instance samples per epoch: that number is
    split over their (portion, bucket) cells in proportion to images x repeats, by largest remainders and
    at least one per cell (so every bucket trains; only with more cells than instance samples do they
    take more). Rounding each bucket's share on its own would over-draw small buckets: 20 instance and
    400 class images over 15 buckets would train 26 class samples per epoch.
    """
    images = [Counter(part) for part in _per_portion(portions, buckets)]
    counts: list[Counter[Bucket]] = []
    for portion, in_buckets in zip(portions, images, strict=True):
        whole, fraction = _split(portion.repeats)
        counts.append(
            Counter(
                {
                    bucket: whole * count + (share_count(fraction, count) if fraction else 0)
                    for bucket, count in in_buckets.items()
                }
            )
        )
    cells = [
        (index, bucket, count)
        for index, portion in enumerate(portions)
        if portion.balanced
        for bucket, count in images[index].items()
    ]
    if cells:
        instance = sum(sum(counts[i].values()) for i, portion in enumerate(portions) if not portion.reg)
        weights = [count * portions[index].repeats for index, _, count in cells]
        for (index, bucket, _), part in zip(cells, _apportion(instance, weights), strict=True):
            counts[index][bucket] = part
    return counts


def expand_repeats(
    portions: Sequence[Portion], plans: Sequence[CropPlan]
) -> tuple[list[CaptionedImage], list[CropPlan], list[tuple[int, float] | None]]:
    """(samples, plans, shares) of the training list: each portion's samples (with `plans`, one per
    sample in portion order), copied so that each bucket trains its `samples_per_bucket`: the whole
    part as copies, the rest as one more copy with a share (portion number, fraction of the bucket's
    images) for `GroupedBatchSampler`, which draws exactly that many of them per epoch."""
    buckets = [plan.bucket for plan in plans]
    counts = samples_per_bucket(portions, buckets)
    samples: list[CaptionedImage] = []
    expanded_plans: list[CropPlan] = []
    shares: list[tuple[int, float] | None] = []
    plan_of = iter(plans)
    for number, (portion, part) in enumerate(zip(portions, _per_portion(portions, buckets), strict=True)):
        images = Counter(part)
        for sample in portion.samples:
            plan = next(plan_of)
            whole, rest = divmod(counts[number][plan.bucket], images[plan.bucket])
            copies: list[tuple[int, float] | None] = [None] * whole
            if rest:
                copies.append((number, rest / images[plan.bucket]))
            samples.extend([sample] * len(copies))
            expanded_plans.extend([plan] * len(copies))
            shares.extend(copies)
    return samples, expanded_plans, shares


def epoch_buckets(portions: Sequence[Portion], buckets: Sequence[Bucket]) -> list[Bucket]:
    """One bucket per sample trained in an epoch (repeats counted), for the bucket histogram; `buckets`
    holds each image's bucket, in portion order."""
    return [bucket for counts in samples_per_bucket(portions, buckets) for bucket in counts.elements()]


def is_plain(portions: Sequence[Portion]) -> bool:
    """One folder, each image once per epoch: there is no mix to report (and samples are images)."""
    return len(portions) == 1 and portions[0].repeats == 1


def mix_rows(portions: Sequence[Portion], buckets: Sequence[Bucket]) -> list[dict]:
    """Per portion: source, folder, images, repeats, samples per epoch and kind (the mix printed at the
    start of a run and by `tuner data check`); `buckets` holds each sample's bucket, in portion order."""
    return [
        {
            "source": portion.source,
            "folder": portion.name,
            "images": len(portion.samples),
            "repeats": round(portion.repeats, 3),
            "samples_per_epoch": sum(counts.values()),
            "kind": ("class, balanced" if portion.balanced else "class") if portion.reg else "instance",
        }
        for portion, counts in zip(portions, samples_per_bucket(portions, buckets), strict=True)
    ]


def format_mix(rows: Sequence[dict]) -> str:
    """The mix as a table, with the instance and class totals per epoch."""
    header = ("source", "folder", "images", "repeats", "samples/epoch", "kind")
    table = [header] + [
        (
            row["source"],
            row["folder"],
            str(row["images"]),
            f"{row['repeats']:g}",
            str(row["samples_per_epoch"]),
            row["kind"],
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in table]
    instance = sum(row["samples_per_epoch"] for row in rows if row["kind"] == "instance")
    reg = sum(row["samples_per_epoch"] for row in rows if row["kind"] != "instance")
    lines.append(f"samples per epoch: {instance} instance + {reg} class = {instance + reg}")
    return "\n".join(line.rstrip() for line in lines)


def filled_caption_notes(source: str, scan: CaptionScan) -> list[str]:
    """One line per origin of captions that images without a caption file got (never silent)."""
    return [
        f"note: {count} image{'' if count == 1 else 's'} of {source} without a caption file "
        + (
            f"captioned {_folder_words(origin)!r} from {origin} (kohya's folder rule)"
            if origin.startswith("folder ")
            else "captioned with data.class_prompt"
        )
        for origin, count in scan.filled_captions.items()
    ]


def _folder_words(origin: str) -> str:
    kohya = parse_kohya_folder(origin.removeprefix("folder "))
    return kohya.words if kohya else ""


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split in proportion to `weights` by largest remainders (Hamilton's method), each part at
    least 1; the parts sum to `total` unless there are more parts than that."""
    quotas = [total * weight / sum(weights) for weight in weights]
    parts = [max(1, math.floor(quota)) for quota in quotas]
    missing = total - sum(parts)
    # The parts furthest below their quota gain one each; ties go to the earlier part.
    for index in sorted(range(len(parts)), key=lambda i: parts[i] - quotas[i])[: max(missing, 0)]:
        parts[index] += 1
    # Parts raised to 1 can overshoot: the ones furthest above their quota give one back, down to 1.
    while missing < 0 and any(part > 1 for part in parts):
        index = max((i for i in range(len(parts)) if parts[i] > 1), key=lambda i: parts[i] - quotas[i])
        parts[index] -= 1
        missing += 1
    return parts


def _split(repeats: float) -> tuple[int, float]:
    whole = math.floor(repeats + _MIN_SHARE)
    fraction = repeats - whole
    return whole, fraction if fraction > _MIN_SHARE else 0.0


def _per_portion(portions: Sequence[Portion], values: Sequence[T]) -> list[Sequence[T]]:
    """`values` (one per image, in portion order) cut into one slice per portion."""
    parts, start = [], 0
    for portion in portions:
        parts.append(values[start : start + len(portion.samples)])
        start += len(portion.samples)
    return parts
