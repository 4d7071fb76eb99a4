from __future__ import annotations

import dataclasses
import math
import random

import pytest
from PIL import Image

from tuner.data.buckets import apply_crop, bucket_histogram, nearest_bucket, plan_crop, sdxl_buckets
from tuner.errors import ConfigError

SDXL_PUBLISHED = [
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
]


@pytest.mark.parametrize(("resolution", "step"), [(1024, 64), (512, 64), (128, 8), (1000, 64)])
def test_buckets_are_step_multiples_within_area_and_ratio(resolution: int, step: int) -> None:
    buckets = sdxl_buckets(resolution, step, max_ratio=4.0)
    assert len(set(buckets)) == len(buckets)
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert width * height <= resolution**2
        # Close to the area: one side is as long as the area allows for the other.
        assert max(width * (height + step), (width + step) * height) > resolution**2
        assert max(width / height, height / width) <= 4.0
        assert (height, width) in buckets


def test_1024_buckets_contain_sdxls_published_sizes() -> None:
    buckets = sdxl_buckets(1024, 64)
    assert all(bucket in buckets for bucket in SDXL_PUBLISHED)


def test_max_ratio_limits_the_extremes() -> None:
    assert max(max(w / h, h / w) for w, h in sdxl_buckets(1024, 64, max_ratio=2.0)) <= 2.0
    assert (2048, 512) in sdxl_buckets(1024, 64, max_ratio=4.0)


def test_impossible_step_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        sdxl_buckets(resolution=32, step=64)


@pytest.mark.parametrize(
    ("width", "height"), [(1000, 1000), (3000, 2000), (600, 1800), (4000, 1000), (333, 777)]
)
def test_each_image_lands_in_the_bucket_nearest_its_aspect(width: int, height: int) -> None:
    buckets = sdxl_buckets(1024, 64)
    chosen = nearest_bucket(width, height, buckets)
    distance = abs(math.log(chosen[0] / chosen[1]) - math.log(width / height))
    assert all(distance <= abs(math.log(w / h) - math.log(width / height)) + 1e-12 for w, h in buckets)


def test_two_by_one_goes_landscape_and_ties_prefer_larger_area() -> None:
    width, height = nearest_bucket(2000, 1000, sdxl_buckets(1024, 64))
    assert width > height
    assert nearest_bucket(100, 100, [(64, 64), (128, 128), (128, 64)]) == (128, 128)


@pytest.mark.parametrize(("width", "height"), [(2000, 1000), (640, 1536), (999, 1001), (50, 40)])
@pytest.mark.parametrize("center", [True, False])
def test_plan_covers_the_bucket_and_crops_within_bounds(width: int, height: int, center: bool) -> None:
    bucket = nearest_bucket(width, height, sdxl_buckets(1024, 64))
    plan = plan_crop(width, height, bucket, center=center, rng=random.Random(0))
    assert plan.original_size == (height, width)
    assert plan.resized[0] >= bucket[0] and plan.resized[1] >= bucket[1]
    # Aspect preserved up to rounding of one pixel.
    assert abs(plan.resized[0] / plan.resized[1] - width / height) <= 1.5 / min(plan.resized)
    top, left = plan.crop_top_left
    assert 0 <= top <= plan.resized[1] - bucket[1]
    assert 0 <= left <= plan.resized[0] - bucket[0]
    assert plan.target_size == (bucket[1], bucket[0])


def test_center_crop_is_centred_and_random_crop_varies() -> None:
    plan = plan_crop(300, 100, (64, 64))
    assert plan.resized == (192, 64) and plan.crop_top_left == (0, 64)
    rng = random.Random(1)
    lefts = {plan_crop(300, 100, (64, 64), center=False, rng=rng).crop_top_left[1] for _ in range(20)}
    assert len(lefts) > 1 and all(0 <= left <= 128 for left in lefts)


def test_square_mode_without_buckets() -> None:
    plan = plan_crop(1600, 900, (1024, 1024))
    assert plan.bucket == (1024, 1024) and plan.resized[1] == 1024 and plan.crop_top_left[0] == 0


def test_apply_crop_returns_the_planned_region() -> None:
    # Left third red, middle green, right third blue: a centre crop of a 3:1 image to a square is green.
    image = Image.new("RGB", (300, 100), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 100, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    plan = plan_crop(300, 100, (64, 64))
    out = apply_crop(image, plan)
    assert out.size == (64, 64) and out.getpixel((32, 32)) == (0, 255, 0)
    left_plan = plan_crop(300, 100, (64, 64), center=False, rng=random.Random(0))
    left_plan = dataclasses.replace(left_plan, crop_top_left=(0, 0))
    assert apply_crop(image, left_plan).getpixel((5, 32))[0] > 200
    # Flipped, the same offsets see the mirrored image: blue now sits at the left.
    assert apply_crop(image, left_plan, flip=True).getpixel((5, 32))[2] > 200


def test_histogram_counts_and_flags_small_buckets() -> None:
    table = bucket_histogram([(1024, 1024)] * 5 + [(1344, 768)] * 2, batch_size=4)
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert rows["1024x1024"].split()[1] == "5" and "batch of" not in rows["1024x1024"]
    assert rows["1344x768"].split()[1] == "2"
    assert "batch of 2" in rows["1344x768"] and "nothing dropped" in rows["1344x768"]
    assert rows["total"].split()[1] == "7"
