"""Loss masks: where each image's mask is found, what white and black mean, and which masks are problems."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tuner.data.buckets import plan_crop
from tuner.data.captions import ALPHA_MASK, CaptionedImage, scan_caption_dataset
from tuner.data.check import check_sdxl_dataset
from tuner.data.masks import MaskCounts, find_masks, load_mask, mask_counts
from tuner.errors import DataError
from tuner.models.sdxl_cache import latent_mask


def image(
    folder: Path, name: str, size: tuple[int, int] = (64, 64), mode: str = "RGB", alpha: int = 255
) -> Path:
    """An image with a caption; RGBA ones are transparent (`alpha`) on their right half."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = Image.new(mode, size, (120, 80, 40, 255)[: len(mode)])
    if mode == "RGBA":
        pixels = np.array(picture)
        pixels[:, size[0] // 2 :, 3] = alpha
        picture = Image.fromarray(pixels, "RGBA")
    picture.save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(f"caption {name}", encoding="utf-8")
    return folder / f"{name}.png"


def half_mask(path: Path, size: tuple[int, int] = (64, 64), left: int = 255, right: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0]), right, dtype=np.uint8)
    pixels[:, : size[0] // 2] = left
    Image.fromarray(pixels, "L").save(path)
    return path


def masks_of(folder: Path, mask_dir: Path | None = None):
    return find_masks(scan_caption_dataset(folder, check_images=True).samples, mask_dir)


def test_mask_dir_then_masks_folder_then_alpha_then_none(tmp_path: Path) -> None:
    data, mask_dir = tmp_path / "data", tmp_path / "mask-dir"
    image(data, "a")
    image(data, "b")
    image(data, "c", mode="RGBA", alpha=0)
    image(data, "d")
    image(data, "e", mode="RGBA", alpha=255)  # an alpha channel that hides nothing is no mask
    half_mask(mask_dir / "a.webp")  # any image extension
    half_mask(data / "masks" / "a.png")  # the mask folder wins over masks/
    half_mask(data / "masks" / "b.jpg")
    half_mask(data / "masks" / "c.png")  # a mask file wins over the alpha channel

    scan = masks_of(data, mask_dir)
    found = {sample.image.stem: sample.mask for sample in scan.samples}
    assert scan.problems == []
    assert found == {
        "a": mask_dir / "a.webp",
        "b": data / "masks" / "b.jpg",
        "c": data / "masks" / "c.png",
        "d": None,
        "e": None,
    }
    (data / "masks" / "c.png").unlink()
    assert {s.image.stem: s.mask for s in masks_of(data).samples}["c"] == ALPHA_MASK
    assert scan.counts == MaskCounts(files=3, alpha=0, none=2)
    assert str(scan.counts).startswith("masks: 3 from mask files, 0 from alpha channels, 2 without a mask")


def test_masks_folder_is_not_training_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    image(data, "a")
    half_mask(data / "masks" / "a.png")  # no caption beside it: scanned as an image it would be a problem
    scan = scan_caption_dataset(data)
    assert [sample.image.name for sample in scan.samples] == ["a.png"] and scan.problems == []


def test_repeated_images_count_once() -> None:
    sample = CaptionedImage(image=Path("/x/a.png"), caption="a", source="a.txt", mask=ALPHA_MASK)
    other = CaptionedImage(image=Path("/x/b.png"), caption="b", source="b.txt")
    assert mask_counts([sample, sample, other]) == MaskCounts(files=0, alpha=1, none=1)


def test_white_is_trained_black_is_ignored_grey_weighs(tmp_path: Path) -> None:
    """sd-scripts #1172 shipped these inverted: white must be 1 (trained), black 0 (ignored)."""
    data = tmp_path / "data"
    image(data, "a")
    half_mask(data / "masks" / "a.png", left=255, right=0)
    image(data, "g")
    half_mask(data / "masks" / "g.png", left=255, right=51)
    samples = {sample.image.stem: sample for sample in masks_of(data).samples}
    plan = plan_crop(64, 64, (64, 64))

    mask = latent_mask(samples["a"], plan, flip=False, scale=8, max_pixels=10**8)
    assert mask.shape == (1, 8, 8)
    assert torch.equal(mask[..., :4], torch.ones(1, 8, 4)) and torch.equal(
        mask[..., 4:], torch.zeros(1, 8, 4)
    )
    grey = latent_mask(samples["g"], plan, flip=False, scale=8, max_pixels=10**8)
    torch.testing.assert_close(grey[..., 4:], torch.full((1, 8, 4), 51 / 255))


def test_alpha_mask_is_opacity(tmp_path: Path) -> None:
    data = tmp_path / "data"
    image(data, "a", mode="RGBA", alpha=0)  # left opaque, right transparent
    (sample,) = masks_of(data).samples
    assert sample.mask == ALPHA_MASK
    mask = latent_mask(sample, plan_crop(64, 64, (64, 64)), flip=False, scale=8, max_pixels=10**8)
    assert mask[..., :4].min() == 1 and mask[..., 4:].max() == 0


def test_area_averaging_to_latent_resolution(tmp_path: Path) -> None:
    data = tmp_path / "data"
    image(data, "a")
    # One white pixel column in every 8: each latent covers 8x8 pixels, one eighth of them white.
    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[:, ::8] = 255
    (data / "masks").mkdir()
    Image.fromarray(pixels, "L").save(data / "masks" / "a.png")
    (sample,) = masks_of(data).samples
    mask = latent_mask(sample, plan_crop(64, 64, (64, 64)), flip=False, scale=8, max_pixels=10**8)
    torch.testing.assert_close(mask, torch.full((1, 8, 8), 1 / 8))


def test_size_mismatch_empty_unreadable_and_ambiguous_masks_are_problems(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in "abcde":
        image(data, name)
    half_mask(data / "masks" / "a.png", size=(32, 64))
    half_mask(data / "masks" / "b.png", left=0, right=0)
    (data / "masks" / "c.png").write_bytes(b"not a png")
    half_mask(data / "masks" / "d.png")
    half_mask(data / "masks" / "d.jpg")
    scan = masks_of(data)
    assert [sample.image.stem for sample in scan.samples] == ["e"]
    problems = {problem.kind: problem for problem in scan.problems}
    assert set(problems) == {"mask-size", "empty-mask", "unreadable-mask", "ambiguous-mask"}
    assert problems["mask-size"].file == str(data / "masks" / "a.png")
    assert "mask is 32x64, but its image" in problems["mask-size"].what
    assert str(data / "a.png") in problems["mask-size"].what
    assert problems["empty-mask"].file == str(data / "masks" / "b.png")
    assert problems["unreadable-mask"].file == str(data / "masks" / "c.png")


def test_fully_transparent_image_is_an_empty_mask(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = data / "a.png"
    image(data, "a")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(path)
    scan = masks_of(data)
    assert scan.samples == [] and [problem.kind for problem in scan.problems] == ["empty-mask"]
    assert scan.problems[0].file == str(path)


def test_missing_mask_dir_is_a_user_error(tmp_path: Path) -> None:
    image(tmp_path / "data", "a")
    with pytest.raises(DataError, match=r"mask folder .* does not exist"):
        masks_of(tmp_path / "data", tmp_path / "nowhere")


def test_hf_dataset_rows_take_masks_from_alpha(tmp_path: Path) -> None:
    import datasets

    pictures = [
        Image.open(image(tmp_path / "src", "a", mode="RGBA", alpha=0)),
        Image.open(image(tmp_path / "src", "b")),
    ]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {"image": pictures, "text": ["a", "b"]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    scan = masks_of(tmp_path / "hf")
    assert [sample.mask for sample in scan.samples] == [ALPHA_MASK, None]
    assert np.asarray(load_mask(scan.samples[0]))[:, 40:].max() == 0


def test_data_check_counts_masks_and_names_a_mismatched_mask(tmp_path: Path) -> None:
    data = tmp_path / "data"
    image(data, "a")
    image(data, "b", mode="RGBA", alpha=0)
    image(data, "c")
    half_mask(data / "masks" / "a.png", size=(48, 64))
    report = check_sdxl_dataset(data, masked_loss=True)
    assert report.samples_ok == 2
    assert [(problem.file, problem.kind) for problem in report.problems] == [
        (str(data / "masks" / "a.png"), "mask-size")
    ]
    assert (report.stats["masks_from_files"], report.stats["masks_from_alpha"]) == (0, 1)
    assert report.stats["images_without_mask"] == 1
    assert "masks from alpha:" in report.format_text()
    # Without masked loss the masks are not looked at.
    assert check_sdxl_dataset(data).problems == []


def test_a_mask_dir_mirroring_subfolders_keeps_same_named_images_apart(tmp_path: Path) -> None:
    data, mask_dir = tmp_path / "data", tmp_path / "mask-dir"
    image(data / "10_sks", "cat")
    image(data / "style", "cat")
    image(data / "style", "dog")
    half_mask(mask_dir / "10_sks" / "cat.png")
    half_mask(mask_dir / "style" / "cat.png")
    half_mask(mask_dir / "dog.png")  # a flat mask folder still matches by name

    found = {str(s.image.relative_to(data)): s.mask for s in masks_of(data, mask_dir).samples}
    assert found == {
        "10_sks/cat.png": mask_dir / "10_sks" / "cat.png",
        "style/cat.png": mask_dir / "style" / "cat.png",
        "style/dog.png": mask_dir / "dog.png",
    }
