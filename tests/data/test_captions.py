from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from tuner.data.captions import CaptionedImage, DatasetRow, scan_caption_dataset, transform_caption
from tuner.errors import DataError


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _kinds(scan, found: str = "problems") -> dict[str, list[tuple[str, int | None]]]:
    kinds: dict[str, list[tuple[str, int | None]]] = {}
    for problem in getattr(scan, found):
        kinds.setdefault(problem.kind, []).append((Path(problem.file).name, problem.record))
    return kinds


def test_kohya_folder_pairs_images_with_txt_in_nested_folders(tmp_path: Path) -> None:
    _image(tmp_path / "b.png", (1, 0, 0))
    (tmp_path / "b.txt").write_text("\ufeffa red square\n")
    _image(tmp_path / "sub" / "a.jpg", (0, 200, 0))
    (tmp_path / "sub" / "a.txt").write_text("green, tag\nsecond line\n")
    _image(tmp_path / ".hidden" / "x.png", (0, 0, 3))
    scan = scan_caption_dataset(tmp_path)
    assert scan.layout == "folder-txt" and scan.problems == []
    assert [sample.image for sample in scan.samples] == [tmp_path / "b.png", tmp_path / "sub" / "a.jpg"]
    assert [sample.caption for sample in scan.samples] == ["a red square", "green, tag second line"]
    assert scan.samples[0].source == str(tmp_path / "b.txt")
    assert all(sample.image.is_absolute() for sample in scan.samples)
    assert scan.samples[1].load().size == (8, 6)


def test_kohya_folder_reports_every_problem(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", (1, 0, 0))
    (tmp_path / "a.txt").write_text("fine")
    _image(tmp_path / "b.png", (2, 0, 0))  # no caption
    _image(tmp_path / "c.png", (3, 0, 0))
    (tmp_path / "c.txt").write_text("  \n")
    (tmp_path / "d.txt").write_text("no image for me")
    _image(tmp_path / "e.png", (1, 0, 0))  # same pixels and bytes as a.png
    (tmp_path / "e.txt").write_text("copy")
    (tmp_path / "f.png").write_text("text pretending")
    (tmp_path / "f.txt").write_text("broken")
    scan = scan_caption_dataset(tmp_path)
    # A duplicate trains (a warning, not a problem): the same picture with two captions is common.
    assert [sample.image.name for sample in scan.samples] == ["a.png", "e.png", "f.png"]
    assert _kinds(scan) == {
        "missing-caption": [("b.png", None)],
        "empty-caption": [("c.txt", None)],
        "orphan-caption": [("d.txt", None)],
    }
    assert _kinds(scan, "warnings") == {"duplicate-image": [("e.png", None)]}
    assert str(tmp_path / "a.png") in scan.warnings[0].what

    checked = scan_caption_dataset(tmp_path, check_images=True)
    assert [sample.image.name for sample in checked.samples] == ["a.png", "e.png"]
    assert _kinds(checked)["not-an-image"] == [("f.png", None)]


def test_check_images_reports_size_limits(tmp_path: Path) -> None:
    _image(tmp_path / "big.png", (1, 0, 0), size=(40, 40))
    _image(tmp_path / "small.png", (2, 0, 0), size=(4, 4))
    for name in ("big", "small"):
        (tmp_path / f"{name}.txt").write_text(name)
    scan = scan_caption_dataset(tmp_path, check_images=True, max_pixels=1000, min_side=5)
    assert scan.samples == []
    assert _kinds(scan) == {"too-large": [("big.png", None)], "too-small": [("small.png", None)]}


def test_metadata_jsonl_layout_and_its_problems(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _image(root / "imgs" / "one.png", (1, 0, 0))
    _image(root / "two.png", (2, 0, 0))
    _image(root / "three.png", (1, 0, 0))  # duplicate of one.png
    _image(tmp_path / "outside.png", (9, 0, 0))
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    lines = [
        {"file_name": "two.png", "text": "second"},
        {"file_name": "imgs/one.png", "text": " first "},
        "{not json",
        {"file_name": "three.png"},
        {"file_name": "../outside.png", "text": "escape"},
        {"file_name": str(tmp_path / "outside.png"), "text": "absolute"},
        {"file_name": "link.png", "text": "symlink"},
        {"file_name": "gone.png", "text": "missing"},
        {"file_name": "three.png", "text": ""},
        ["a", "list"],
        {"file_name": "three.png", "text": "dup"},
    ]
    (root / "metadata.jsonl").write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    scan = scan_caption_dataset(root)
    assert scan.layout == "metadata-jsonl"
    assert [(s.image, s.caption) for s in scan.samples] == [
        (root / "imgs" / "one.png", "first"),
        (root / "three.png", "dup"),
        (root / "two.png", "second"),
    ]
    assert scan.samples[0].source == f"{root / 'metadata.jsonl'}:2"
    assert _kinds(scan) == {
        "malformed-line": [("metadata.jsonl", 3), ("metadata.jsonl", 10)],
        "missing-key": [("metadata.jsonl", 4)],
        "path-escape": [("metadata.jsonl", 5), ("metadata.jsonl", 6), ("metadata.jsonl", 7)],
        "empty-caption": [("metadata.jsonl", 9)],
        "missing-image": [("metadata.jsonl", 8)],
    }
    assert _kinds(scan, "warnings") == {"duplicate-image": [("metadata.jsonl", 11)]}
    assert "three.png" in scan.warnings[0].what and "imgs/one.png" in scan.warnings[0].what


def test_metadata_csv_layout_with_a_custom_caption_column(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", (1, 0, 0))
    _image(tmp_path / "b.png", (2, 0, 0))
    (tmp_path / "metadata.csv").write_text(
        'file_name,caption\nb.png,"bee, with comma"\na.png,ay\nc.png\n,no file\nd.png,x,extra\n'
    )
    scan = scan_caption_dataset(tmp_path, caption_column="caption")
    assert scan.layout == "metadata-csv"
    assert [(s.image.name, s.caption) for s in scan.samples] == [
        ("a.png", "ay"),
        ("b.png", "bee, with comma"),
    ]
    assert _kinds(scan) == {
        "missing-key": [("metadata.csv", 4), ("metadata.csv", 5)],
        "malformed-line": [("metadata.csv", 6)],
    }


def test_caption_column_absent_everywhere_is_fatal_and_names_the_setting(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", (1, 0, 0))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"no 'text'.*caption, file_name") as raised:
        scan_caption_dataset(tmp_path)
    assert "data.caption_column" in (raised.value.hint or "")
    assert len(scan_caption_dataset(tmp_path, caption_column="caption").samples) == 1


def test_missing_or_empty_dataset_is_fatal(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist"):
        scan_caption_dataset(tmp_path / "nowhere" / "at all")
    (tmp_path / "only.txt").write_text("caption without images")
    with pytest.raises(DataError, match=r"holds no images"):
        scan_caption_dataset(tmp_path)


def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (5, 4), (*colour, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def test_saved_hf_dataset_is_read_lazily(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {
        "picture": [
            {"bytes": _png_bytes((255, 0, 0)), "path": None},
            {"bytes": b"junk", "path": None},
            {"bytes": _png_bytes((0, 0, 255)), "path": None},
            {"bytes": _png_bytes((255, 0, 0)), "path": None},
            None,
        ],
        "caption": ["red", "junk", "", "red again", "nothing"],
    }
    dataset = datasets.Dataset.from_dict(rows).cast_column("picture", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"))
    scan = scan_caption_dataset(tmp_path / "saved", image_column="picture", caption_column="caption")
    assert scan.layout == "hf-dataset"
    assert [(s.caption, s.image.row) for s in scan.samples] == [("red", 0), ("junk", 1), ("red again", 3)]
    assert isinstance(scan.samples[0].image, DatasetRow)
    assert _kinds(scan) == {
        "empty-caption": [("saved", 3)],
        "missing-image": [("saved", 5)],
    }
    assert _kinds(scan, "warnings") == {"duplicate-image": [("saved", 4)]}
    # Decoded only on load, through the same loader as files (transparency onto the background).
    assert scan.samples[0].load().getpixel((0, 0)) == (255, 127, 127)
    with pytest.raises(DataError, match=r"not an image"):
        scan.samples[1].load()
    checked = scan_caption_dataset(
        tmp_path / "saved", image_column="picture", caption_column="caption", check_images=True
    )
    assert [s.caption for s in checked.samples] == ["red", "red again"]
    assert _kinds(checked)["not-an-image"] == [("saved", 2)]


def test_hf_dataset_with_wrong_column_names_the_columns(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"image": [_png_bytes((1, 2, 3))], "caption": ["x"]})
    dataset.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"no column 'text'.*image, caption"):
        scan_caption_dataset(tmp_path / "saved")
    samples = scan_caption_dataset(tmp_path / "saved", caption_column="caption").samples
    assert samples[0].load().size == (5, 4)


def test_samples_survive_pickling_for_dataloader_workers(tmp_path: Path) -> None:
    import pickle

    sample = CaptionedImage(image=DatasetRow(str(tmp_path), None, 3, "image", True), caption="c", source="s")
    assert pickle.loads(pickle.dumps(sample)) == sample


def test_transform_caption() -> None:
    rng = random.Random(0)
    assert transform_caption("a, b", rng=rng) == "a, b"
    assert transform_caption("a, b", prefix="sks", rng=rng) == "sks, a, b"
    assert transform_caption("", prefix="sks", rng=rng) == "sks"
    tags = "keep1, keep2, " + ", ".join(f"t{i}" for i in range(12))
    shuffled = {transform_caption(tags, shuffle_tags=True, keep_tags=2, rng=rng) for _ in range(10)}
    assert len(shuffled) > 1
    for caption in shuffled:
        parts = caption.split(", ")
        assert parts[:2] == ["keep1", "keep2"] and sorted(parts[2:]) == sorted(tags.split(", ")[2:])
    with_prefix = transform_caption(tags, prefix="sks", shuffle_tags=True, keep_tags=1, rng=rng)
    assert with_prefix.startswith("sks, keep1, ")
    assert transform_caption("a", prefix="sks", dropout=1.0, rng=rng) == ""
    dropped = sum(transform_caption("a", dropout=0.25, rng=random.Random(i)) == "" for i in range(400))
    assert 60 < dropped < 140
    first = [transform_caption(tags, shuffle_tags=True, dropout=0.5, rng=random.Random(7)) for _ in range(2)]
    assert first[0] == first[1]


def test_local_parquet_folder_loads_through_load_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    rows = {"image": [{"bytes": _png_bytes((0, 9, 0)), "path": None}], "text": ["green"]}
    (tmp_path / "hub" / "data").mkdir(parents=True)
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    dataset.to_parquet(str(tmp_path / "hub" / "data" / "train-00000.parquet"))
    scan = scan_caption_dataset(tmp_path / "hub")
    assert scan.layout == "hf-dataset" and [s.caption for s in scan.samples] == ["green"]
    assert scan.samples[0].load().size == (5, 4)


def test_unknown_dataset_name_is_a_data_error_offline() -> None:
    with pytest.raises(DataError, match="no folder by that name"):
        scan_caption_dataset("nobody/no-such-dataset")
