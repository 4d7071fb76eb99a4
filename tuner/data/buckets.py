"""SDXL aspect-ratio buckets: which size each image trains at, and how it is resized and cropped.

Sizes in this module are (width, height), as PIL uses them, except where SDXL's micro-conditioning
wants (height, width): `CropPlan.original_size` and `CropPlan.crop_top_left` are already in SDXL's order.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from tuner.errors import ConfigError


def sdxl_buckets(resolution: int = 1024, step: int = 64, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) buckets: multiples of `step`, area at most `resolution`**2, aspect up to `max_ratio`.

    For each width the tallest height that fits the area is taken, so every bucket is as close to
    `resolution`**2 pixels as the step allows; the set is mirrored so portrait and landscape match.
    At 1024 / 64 this yields SDXL's training buckets (1024x1024, 1152x896, 1216x832, 1344x768, 1536x640...).
    Sorted from the widest landscape to the tallest portrait.
    """
    if step < 1 or resolution < step:
        raise ConfigError(
            f"bucket step {step} does not fit resolution {resolution}",
            hint="use a data.bucket_step of at least 1 and no larger than data.resolution (64 is usual)",
        )
    if max_ratio < 1:
        raise ConfigError(
            f"maximum bucket aspect ratio {max_ratio} is below 1", hint="use 1 or more (4 is usual)"
        )
    area = resolution * resolution
    buckets: set[tuple[int, int]] = set()
    width = step
    while width * step <= area:
        height = area // width // step * step
        if max(width / height, height / width) <= max_ratio:
            buckets.update({(width, height), (height, width)})
        width += step
    return sorted(buckets, key=lambda bucket: (-bucket[0] / bucket[1], -bucket[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's in log space; ties go to the larger area."""
    aspect = math.log(width / height)

    def distance(bucket: tuple[int, int]) -> tuple[float, int]:
        # Rounded so that equal distances computed through different float paths still tie.
        return round(abs(math.log(bucket[0] / bucket[1]) - aspect), 9), -bucket[0] * bucket[1]

    return min(buckets, key=distance)


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes one training image, and the SDXL time ids that describe it.

    diffusers builds SDXL's `add_time_ids` as original_size + crops_coords_top_left + target_size, each
    (height, width) / (top, left) (`StableDiffusionXLPipeline._get_add_time_ids`, and the SDXL training
    example records `(image.height, image.width)` before resizing and `(y1, x1)` of the crop after it).
    So the time ids of this sample are `original_size + crop_top_left + (bucket[1], bucket[0])`.
    """

    bucket: tuple[int, int]  # (width, height) of the training image
    resized: tuple[int, int]  # (width, height) after the aspect-preserving resize that covers the bucket
    crop_top_left: tuple[int, int]  # (top, left) in resized pixels: SDXL's crops_coords_top_left
    original_size: tuple[int, int]  # (height, width) of the source image: SDXL's original_size

    @property
    def target_size(self) -> tuple[int, int]:
        """(height, width) of the training image: SDXL's target_size."""
        return self.bucket[1], self.bucket[0]


def plan_crop(
    width: int,
    height: int,
    bucket: tuple[int, int],
    center: bool = True,
    rng: random.Random | None = None,
) -> CropPlan:
    """Resize (width, height) to just cover `bucket`, then crop its centre (or a random spot).

    Without bucketing, pass `(resolution, resolution)` as the bucket for a square crop.
    """
    bucket_width, bucket_height = bucket
    scale = max(bucket_width / width, bucket_height / height)
    # max() keeps rounding from leaving the resized image one pixel short of the bucket.
    resized = (max(bucket_width, round(width * scale)), max(bucket_height, round(height * scale)))
    spare_width, spare_height = resized[0] - bucket_width, resized[1] - bucket_height
    if center:
        top, left = spare_height // 2, spare_width // 2
    else:
        rng = rng if rng is not None else random.Random()
        top, left = rng.randint(0, spare_height), rng.randint(0, spare_width)
    return CropPlan(bucket=bucket, resized=resized, crop_top_left=(top, left), original_size=(height, width))


def apply_crop(image: Image.Image, plan: CropPlan, flip: bool = False) -> Image.Image:
    """Resize and crop `image` as planned; `flip` mirrors it first, as the diffusers SDXL example does.

    Flipping before the crop keeps `plan.crop_top_left` true for the output: it is then measured in the
    mirrored image, so the time ids never need adjusting for the flip.
    """
    resized = image.resize(plan.resized, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left = plan.crop_top_left
    return resized.crop((left, top, left + plan.bucket[0], top + plan.bucket[1]))


def bucket_histogram(assignments: Sequence[tuple[int, int]], batch_size: int, unit: str = "images") -> str:
    """A table of images (or `unit`: samples, repeats counted) per bucket, noting buckets that cannot fill
    one batch."""
    counts = Counter(assignments)
    lines = [f"{'bucket':>11}  {unit:>6}  {'aspect':>6}"]
    for (width, height), count in sorted(counts.items(), key=lambda item: -item[0][0] / item[0][1]):
        line = f"{f'{width}x{height}':>11}  {count:>6}  {width / height:>6.2f}"
        if count < batch_size:
            line += f"  fewer than batch size {batch_size}: trained in a batch of {count} (nothing dropped)"
        lines.append(line)
    lines.append(f"{'total':>11}  {sum(counts.values()):>6}  in {len(counts)} buckets")
    return "\n".join(lines)
