"""Repeats, mixed sources and regularisation images: kohya folders, `--data PATH@N`, balance, expansion."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from tuner.config.schema import DataSource
from tuner.data.buckets import CropPlan
from tuner.data.captions import KohyaFolder, parse_kohya_folder, scan_caption_dataset
from tuner.data.check import check_sdxl_dataset
from tuner.data.mixing import (
    balance_regularisation,
    expand_repeats,
    hold_out_validation,
    mix_rows,
    parse_data_flag,
    split_portions,
)
from tuner.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("10_sks dog", KohyaFolder(10, "sks dog")),
        ("3_style", KohyaFolder(3, "style")),
        ("2_", KohyaFolder(2, "")),  # repeats without class words
        ("abc_x", None),
        ("0_x", None),
        ("10", None),
        ("x_10", None),
    ],
)
def test_kohya_folder_names(name: str, parsed: KohyaFolder | None) -> None:
    assert parse_kohya_folder(name) == parsed


def _images(folder: Path, names: list[str], caption: bool = True, size: tuple[int, int] = (64, 64)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", size, (len(name) * 20 % 255, 90, 160)).save(folder / f"{name}.png")
        if caption:
            (folder / f"{name}.txt").write_text(f"a photo of {name}", encoding="utf-8")


def test_kohya_folders_set_repeats_and_caption_images_without_a_caption_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _images(data / "10_sks dog", ["a", "b"], caption=False)
    _images(data / "10_sks dog", ["c"])
    _images(data / "plain", ["d"])
    _images(data / "plain", ["e"], caption=False)
    scan = scan_caption_dataset(data)
    # kohya's rule fills a caption only inside an `N_words` folder; elsewhere a missing caption is a problem.
    assert [problem.kind for problem in scan.problems] == ["missing-caption"]
    assert scan.filled_captions == {"folder 10_sks dog": 2}
    captions = {Path(sample.image).stem: sample.caption for sample in scan.samples}
    assert captions == {"a": "sks dog", "b": "sks dog", "c": "a photo of c", "d": "a photo of d"}
    portions = split_portions(DataSource(path=str(data)), scan)
    assert [(p.name, len(p.samples), p.repeats) for p in portions] == [("10_sks dog", 3, 10), ("data", 1, 1)]
    # An explicit repeats wins over the folder prefix.
    explicit = split_portions(DataSource(path=str(data), repeats=2), scan)
    assert [p.repeats for p in explicit] == [2, 2]


def test_class_prompt_captions_class_images_without_a_caption(tmp_path: Path) -> None:
    _images(tmp_path / "reg", ["x", "y"], caption=False)
    scan = scan_caption_dataset(tmp_path / "reg", class_prompt="a photo of a dog")
    assert scan.problems == [] and scan.filled_captions == {"class prompt": 2}
    (portion,) = split_portions(DataSource(path="reg", reg=True), scan)
    assert all(sample.prior and sample.caption == "a photo of a dog" for sample in portion.samples)


@pytest.mark.parametrize(
    ("value", "source"),
    [
        ("style/@2", DataSource(path="style/", repeats=2)),
        ("variety@0.5", DataSource(path="variety", repeats=0.5)),
        ("user/name", DataSource(path="user/name")),
        ("C:\\data\\style@3", DataSource(path="C:\\data\\style", repeats=3)),
        ("tiny", DataSource(path="tiny")),
    ],
)
def test_data_flag_syntax(value: str, source: DataSource) -> None:
    assert parse_data_flag(value) == source


@pytest.mark.parametrize("value", ["style@abc", "style@0", "style@-1", "@2", "style@", "style@inf"])
def test_bad_data_flag_suffix_is_a_one_line_config_error(value: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_data_flag(value, "--data")
    assert "\n" not in error.value.message and value in error.value.message
    assert "PATH@N" in (error.value.hint or "")


def test_a_path_that_exists_keeps_its_at_sign(tmp_path: Path) -> None:
    folder = tmp_path / "photos@2x"
    folder.mkdir()
    assert parse_data_flag(str(folder)) == DataSource(path=str(folder))


def _portions(tmp_path: Path) -> list:
    _images(tmp_path / "inst" / "3_sks", ["a", "b"])
    _images(tmp_path / "reg", ["r1", "r2", "r3", "r4"], caption=False)
    instance = split_portions(DataSource(path="inst"), scan_caption_dataset(tmp_path / "inst"))
    reg_scan = scan_caption_dataset(tmp_path / "reg", class_prompt="a dog")
    return instance + split_portions(DataSource(path="reg", reg=True), reg_scan)


def test_regularisation_is_balanced_against_instance_samples_unless_repeats_are_given(tmp_path: Path) -> None:
    portions = balance_regularisation(_portions(tmp_path))
    # 2 instance images x 3 repeats = 6 samples; 4 class images -> 1.5 repeats -> 6 class samples.
    assert [p.repeats for p in portions] == [3, 1.5]
    rows = mix_rows(portions, [(64, 64)] * 6)
    assert [(row["samples_per_epoch"], row["kind"]) for row in rows] == [
        (6, "instance"),
        (6, "class, balanced"),
    ]
    # A reg source with explicit repeats (`--reg-data reg/@1`) is not balanced.
    explicit = [replace(p, balanced=False) for p in _portions(tmp_path)]
    assert [p.repeats for p in balance_regularisation(explicit)] == [3, 1]


def test_repeats_expand_into_copies_and_one_shared_copy(tmp_path: Path) -> None:
    portions = balance_regularisation(_portions(tmp_path))
    plans = [CropPlan((64, 64), (64, 64), (0, 0), (64, 64))] * 6
    samples, expanded, shares = expand_repeats(portions, plans)
    assert len(samples) == len(expanded) == len(shares) == 2 * 3 + 4 * 2
    assert shares[:6] == [None] * 6
    assert shares[6:] == [None, (1, 0.5)] * 4
    assert all(sample.prior for sample in samples[6:]) and not any(s.prior for s in samples[:6])


def test_validation_holds_out_instance_images_before_repeats(tmp_path: Path) -> None:
    portions, validation = hold_out_validation(_portions(tmp_path), 0.5, seed=0)
    assert len(validation) == 1 and not validation[0].prior
    assert [len(p.samples) for p in portions] == [1, 4]  # every class image still trains
    assert validation[0] not in portions[0].samples


def test_data_check_reports_repeats_reg_images_and_folder_captions(tmp_path: Path) -> None:
    _images(tmp_path / "inst" / "3_sks", ["a", "b"], caption=False)
    _images(tmp_path / "reg", ["r1", "r2", "r3", "r4"], caption=False)
    report = check_sdxl_dataset(
        tmp_path / "inst",
        resolution=64,
        bucket_step=32,
        more_sources=[DataSource(path=str(tmp_path / "reg"), reg=True)],
        class_prompt="a dog",
    )
    assert report.problems == []
    assert report.stats["captions_from_folder_names"] == 2 and report.stats["captions_from_class_prompt"] == 4
    assert [(row["folder"], row["repeats"], row["samples_per_epoch"]) for row in report.mix] == [
        ("3_sks", 3, 6),
        ("reg", 1.5, 6),
    ]
    text = report.format_text()
    assert "samples per epoch: 6 instance + 6 class = 12" in text
    assert text.splitlines()[-1].split()[:2] == ["total", "12"]  # the histogram counts samples


def test_balanced_class_images_train_exactly_the_instance_count_every_epoch() -> None:
    from collections import Counter

    from tuner.data.captions import CaptionedImage
    from tuner.data.mixing import Portion, epoch_buckets
    from tuner.data.sampling import GroupedBatchSampler

    # 20 instance images in one bucket; 400 class images over 15 buckets (see the CLI test's sizes).
    sizes = [30] * 11 + [17, 17, 18, 18]
    buckets = [(64 + 16 * number, 64) for number, size in enumerate(sizes) for _ in range(size)]
    dogs = tuple(CaptionedImage(Path(f"d{i}"), "", "") for i in range(20))
    instance = Portion("dog", "dog", False, dogs, 1)
    images = tuple(CaptionedImage(Path(f"c{i}"), "", "", prior=True) for i in range(400))
    portions = balance_regularisation([instance, Portion("class", "class", True, images, 1, balanced=True)])
    all_buckets = [(64, 64)] * 20 + buckets
    plans = [CropPlan(bucket, bucket, (0, 0), bucket) for bucket in all_buckets]
    assert len(epoch_buckets(portions, all_buckets)) == 40
    assert [row["samples_per_epoch"] for row in mix_rows(portions, all_buckets)] == [20, 20]

    samples, expanded, shares = expand_repeats(portions, plans)
    groups = [plan.bucket for plan in expanded]
    sampler = GroupedBatchSampler(groups, batch_size=4, seed=3, shares=shares)
    drawn: Counter[CaptionedImage] = Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        epoch_samples = [samples[index] for batch in sampler for index in batch]
        assert sum(sample.prior for sample in epoch_samples) == 20, epoch
        assert sum(not sample.prior for sample in epoch_samples) == 20
        drawn.update(sample for sample in epoch_samples if sample.prior)
    # Every bucket trains, and within a bucket its images take turns (drawn as often as each other +- 1).
    for bucket in set(buckets):
        times = [drawn[image] for image, where in zip(images, buckets, strict=True) if where == bucket]
        assert max(times) >= 1 and max(times) - min(times) <= 1, bucket
