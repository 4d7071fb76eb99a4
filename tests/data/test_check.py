from __future__ import annotations

import json
import os
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tuner.data.check import (
    DataReport,
    check_qwenvl_dataset,
    check_sdxl_dataset,
    token_length_histogram,
)
from tuner.data.problems import Problem

# Pillow's own words for a corrupt file vary between versions; `…` stands for them in expected lines.
ANY = "…"
UNREADABLE = (
    "image cannot be decoded (…) — the file is probably truncated or corrupt: re-export or re-download it"
)
NOT_AN_IMAGE = "not an image file Pillow can read — remove it or convert it to PNG/JPEG"
ZERO_BYTE = "file is empty (0 bytes) — remove it or re-copy it"
TOO_SMALL = (
    "smaller than {min} px on its short side — "
    "remove it or replace it with a larger version (upscaled images teach blur)"
)
BOMB = (
    "image is 100000x100000 (10,000,000,000 pixels), over the limit of 178,956,970 pixels — "
    "downscale it, or raise data.max_image_pixels if you trust the file"
)


def png(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A noisy PNG (noise keeps it from compressing to nothing, so a truncated copy really is cut short)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = bytes((i * 7919 + seed * 104729) % 251 for i in range(size[0] * size[1] * 3))
    Image.frombytes("RGB", size, noise).save(path)
    return path


def truncated_png(path: Path) -> Path:
    png(path, (64, 64), seed=99)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def bomb_png(path: Path) -> Path:
    """A tiny file whose header claims 100000x100000 pixels: decoding it would take 30 GB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def assert_lines(report: DataReport, expected: list[str], found: str = "problems") -> None:
    """Each expected line matches exactly one problem (or warning) line (`…` stands for Pillow's words),
    none left."""
    unmatched = [str(problem) for problem in getattr(report, found)]
    for pattern in expected:
        regex = re.escape(pattern).replace(re.escape(ANY), ".*")
        hits = [line for line in unmatched if re.fullmatch(regex, line)]
        assert len(hits) == 1, f"{pattern}\nmatched {hits} among:\n" + "\n".join(unmatched)
        unmatched.remove(hits[0])
    assert unmatched == []


# --- SDXL --------------------------------------------------------------------------------------------


@pytest.fixture()
def sdxl_folder(tmp_path: Path) -> Path:
    """A kohya caption folder with one of each broken file, and three good samples."""
    folder = tmp_path.resolve() / "captions"
    for name, size in (("wide", (128, 64)), ("tall", (64, 128)), ("square", (96, 96))):
        png(folder / f"{name}.png", size, seed=len(name))
        (folder / f"{name}.txt").write_text(f"a {name} picture of noise\n")
    png(folder / "sub" / "copy.png", (96, 96), seed=len("square"))  # same bytes as square.png
    truncated_png(folder / "truncated.png")
    (folder / "fake.jpg").write_text("this is text, not a JPEG")
    (folder / "empty.png").write_bytes(b"")
    png(folder / "small.png", (48, 80))
    png(folder / "uncaptioned.png", (64, 64), seed=5)
    png(folder / "blank.png", (64, 64), seed=6)
    (folder / "blank.txt").write_text("  \n\n")
    (folder / "orphan.txt").write_text("a caption whose image was deleted")
    for name in ("sub/copy", "truncated", "fake", "empty", "small"):
        (folder / f"{name}.txt").write_text("a caption")
    return folder


def test_sdxl_folder_reports_every_problem_with_its_file(sdxl_folder: Path) -> None:
    report = check_sdxl_dataset(sdxl_folder)
    d = str(sdxl_folder)
    assert_lines(
        report,
        [
            f"{d}/truncated.png: {UNREADABLE}",
            f"{d}/fake.jpg: {NOT_AN_IMAGE}",
            f"{d}/empty.png: {ZERO_BYTE}",
            f"{d}/small.png: image is 48x80, " + TOO_SMALL.format(min=64),
            f"{d}/uncaptioned.png: no caption file uncaptioned.txt beside the image — "
            "write the caption into that .txt file, or remove the image",
            f"{d}/blank.txt: caption file is empty — write a caption or remove the image",
            f"{d}/orphan.txt: caption file without an image of the same name — "
            "rename it to match its image, or remove it",
        ],
    )
    # The copy trains: a duplicate is a warning, reported but never refused.
    assert_lines(
        report,
        [
            f"{d}/sub/copy.png: image {d}/sub/copy.png has the same content as {d}/square.png — "
            "it trains twice as often; remove one copy unless that is intended"
        ],
        found="warnings",
    )
    assert report.samples_ok == 4
    assert report.warning_counts() == {"duplicate-image": 1}
    assert sum(report.problem_counts().values()) == 7
    text = report.format_text()
    assert "warning: " + str(report.warnings[0]) in text and "1 warning (duplicate-image 1)" in text


def test_sdxl_min_size_is_a_setting(sdxl_folder: Path) -> None:
    report = check_sdxl_dataset(sdxl_folder, min_size=100)
    too_small = sorted(Path(p.file).name for p in report.problems if p.kind == "too-small")
    # The four good samples (the copy of square.png too) are under 100 px on their short side now.
    assert too_small == ["copy.png", "small.png", "square.png", "tall.png", "wide.png"]
    assert report.samples_ok == 0


def test_sdxl_metadata_reports_lines_keys_and_escaping_paths(tmp_path: Path) -> None:
    folder = tmp_path.resolve() / "meta"
    png(folder / "ok.png", (80, 64))
    png(folder / "quiet.png", (64, 64), seed=3)
    outside = png(tmp_path.resolve() / "outside.png", (64, 64), seed=4)
    (folder / "link.png").symlink_to(outside)
    records = [
        {"file_name": "ok.png", "text": "a good sample"},
        '{"file_name": "broken.png", "text": ',
        {"file_name": "quiet.png"},
        {"file_name": "../outside.png", "text": "walks out with .."},
        {"file_name": str(outside), "text": "an absolute path"},
        {"file_name": "link.png", "text": "a symlink pointing outside"},
        {"file_name": "quiet.png", "text": "   "},
        {"file_name": "gone.png", "text": "a missing image"},
    ]
    (folder / "metadata.jsonl").write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"
    )
    report = check_sdxl_dataset(folder)
    m = f"{folder}/metadata.jsonl"
    escape_fix = "copy the image into the dataset folder and use a relative path without '..'"
    assert_lines(
        report,
        [
            f"{m}:2: line is not valid JSON (…) — fix or remove the line",
            f"{m}:3: record has no 'text' — add 'text' to this record",
            f"{m}:4: file_name '../outside.png' points outside {folder} — {escape_fix}",
            f"{m}:5: file_name '{outside}' points outside {folder} — {escape_fix}",
            f"{m}:6: file_name 'link.png' points outside {folder} — {escape_fix}",
            f"{m}:7: caption of quiet.png is empty — write a caption",
            f"{m}:8: image gone.png does not exist — fix the name or add the image",
        ],
    )
    assert report.samples_ok == 1


def test_clean_sdxl_report_has_statistics_and_bucket_histogram(sdxl_folder: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    for name in ("wide", "tall", "square"):
        clean.mkdir(exist_ok=True)
        os.link(sdxl_folder / f"{name}.png", clean / f"{name}.png")
        os.link(sdxl_folder / f"{name}.txt", clean / f"{name}.txt")
    report = check_sdxl_dataset(clean, batch_size=2)
    assert report.problems == []
    assert report.stats["width"] == {"min": 64, "median": 96, "max": 128}
    assert report.stats["aspect"] == {"min": 0.5, "median": 1, "max": 2}
    assert report.stats["caption_words"] == {"min": 5, "median": 5, "max": 5}
    # SDXL's own 1024 px buckets hold exact 2:1 and 1:2 shapes.
    rows = [line.split()[:2] for line in report.histogram.splitlines()[1:]]
    assert rows == [["1408x704", "1"], ["1024x1024", "1"], ["704x1408", "1"], ["total", "3"]]
    assert "fewer than batch size 2" in report.histogram
    text = report.format_text()
    assert text.splitlines()[0] == f"sdxl dataset {clean}: 3 samples ok, 0 problems"
    assert report.histogram in text


def test_exif_rotated_image_is_measured_upright(tmp_path: Path) -> None:
    folder = tmp_path / "exif"
    folder.mkdir()
    image = Image.frombytes("RGB", (128, 64), bytes(128 * 64 * 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the camera held it upright
    image.save(folder / "photo.jpg", exif=exif)
    (folder / "photo.txt").write_text("a portrait photo")
    report = check_sdxl_dataset(folder)
    assert (report.stats["width"]["max"], report.stats["height"]["max"]) == (64, 128)


@pytest.mark.parametrize("recipe", ["sdxl", "qwenvl"])
def test_decompression_bomb_is_reported_without_decoding_it(tmp_path: Path, recipe: str) -> None:
    bomb_png(tmp_path / "bomb.png")
    if recipe == "sdxl":
        (tmp_path / "bomb.txt").write_text("a caption")
        report, where = check_sdxl_dataset(tmp_path), f"{tmp_path}/bomb.png"
    else:
        data = tmp_path / "train.jsonl"
        data.write_text(json.dumps({"messages": _turns("<image>What?"), "images": ["bomb.png"]}))
        report, where = check_qwenvl_dataset(data), f"{data}:1: image bomb.png"
    assert [str(problem) for problem in report.problems] == [f"{where}: {BOMB}"]


# --- Qwen-VL ------------------------------------------------------------------------------------------


def _turns(question: str, answer: str = "An answer.") -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture()
def qwenvl_corpus(tmp_path: Path) -> Path:
    root = tmp_path.resolve() / "vl"
    png(root / "img" / "cat.png", (64, 48))
    png(root / "img" / "dog.png", (48, 64), seed=2)
    truncated_png(root / "img" / "truncated.png")
    (root / "img" / "fake.png").write_text("<html>not an image</html>")
    (root / "img" / "empty.png").write_bytes(b"")
    png(root / "img" / "small.png", (20, 40))
    png(root / "img" / "strip.png", (6000, 29))
    outside = png(tmp_path.resolve() / "secret.png", (64, 64), seed=7)
    (root / "img" / "link.png").symlink_to(outside)
    one = "<image>What is this?"
    records = [
        {"messages": _turns(one, "A cat."), "images": ["img/cat.png"]},  # 1: fine
        '{"messages": [',  # 2
        {"dialogue": []},  # 3
        {"messages": _turns("<image> or <image>?"), "images": ["img/cat.png"]},  # 4
        {"messages": _turns(one), "images": ["../secret.png"]},  # 5
        {"messages": _turns(one), "images": [str(outside)]},  # 6
        {"messages": _turns(one), "images": ["img/link.png"]},  # 7
        {"messages": [{"role": "tool", "content": "42"}, *_turns("Why?")]},  # 8
        {"messages": [{"role": "user", "content": "Hello?"}]},  # 9
        {"messages": _turns(one), "images": ["img/truncated.png"]},  # 10
        {"messages": _turns(one), "images": ["img/fake.png"]},  # 11
        {"messages": _turns(one), "images": ["img/empty.png"]},  # 12
        {"messages": _turns(one), "images": ["img/small.png"]},  # 13
        {"messages": _turns(one), "images": ["img/strip.png"]},  # 14
        {"messages": _turns(one, "A cat."), "images": ["img/cat.png"]},  # 15: copy of 1
        {"messages": _turns(one), "images": ["img/missing.png"]},  # 16
        {"messages": _turns(one, " "), "images": ["img/dog.png"]},  # 17
        {
            "conversations": [{"from": "human", "value": one}, {"from": "gpt", "value": "A dog."}],
            "image": "img/dog.png",
        },
    ]
    (root / "train.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records))
    return root


def test_qwenvl_reports_every_problem_with_file_and_record(qwenvl_corpus: Path) -> None:
    report = check_qwenvl_dataset(qwenvl_corpus / "train.jsonl")
    f = f"{qwenvl_corpus}/train.jsonl"
    secret = qwenvl_corpus.parent / "secret.png"
    img = f"{qwenvl_corpus}/img"
    assert_lines(
        report,
        [
            f"{f}:2: not valid JSON (…) — write one complete JSON object per line",
            f'{f}:3: the record has neither "messages" nor "conversations" — '
            'add "messages" (role/content) or "conversations" (from/value)',
            f"{f}:4: 2 image placeholder(s) but 1 listed image(s) — "
            'put one <image> (or {"type": "image"}) per listed image, in order',
            f"{f}:5: image '../secret.png' lies outside the image root {qwenvl_corpus} — "
            "keep images under data.image_root (relative paths without `..`)",
            f"{f}:6: image '{secret}' lies outside the image root {qwenvl_corpus} — "
            "keep images under data.image_root (relative paths without `..`)",
            f"{f}:7: image 'img/link.png' is a link to {secret}, outside the image root {qwenvl_corpus} — "
            "copy the image into the image root",
            f"{f}:8: message 1 has role 'tool' — use one of system, user, assistant",
            f"{f}:9: the conversation does not end with an assistant turn — "
            "end every conversation with the answer the model should learn",
            f"{f}:10: image img/truncated.png: {UNREADABLE}",
            f"{f}:11: image img/fake.png: {NOT_AN_IMAGE}",
            f"{f}:12: image img/empty.png: {ZERO_BYTE}",
            f"{f}:13: image img/small.png: image is 20x40, " + TOO_SMALL.format(min=28),
            f"{f}:14: image img/strip.png: image is 6000x29, an aspect ratio over 200:1 "
            "(Qwen-VL refuses it) — crop it, or cut it into several images",
            f"{f}:16: image 'img/missing.png' not found at {img}/missing.png — "
            "fix the path or set data.image_root to the folder the paths are relative to",
            f"{f}:17: message 2 (assistant) is empty — remove the turn or give it text",
        ],
    )
    assert_lines(
        report,
        [
            f"{f}:15: same conversation and images as {f}:1 — "
            "it trains twice as often; remove the copy unless that is intended"
        ],
        found="warnings",
    )
    assert report.samples_ok == 3  # the duplicate trains
    assert report.stats["images"] == 2  # cat and dog, each decoded once however many records use them
    assert report.histogram == ""  # no processor, no token counts


def test_qwenvl_image_root_moves_where_paths_point(qwenvl_corpus: Path, tmp_path: Path) -> None:
    data = tmp_path / "elsewhere" / "train.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"messages": _turns("<image>What?"), "images": ["cat.png"]}) + "\n")
    assert [p.kind for p in check_qwenvl_dataset(data).problems] == ["missing-image"]
    report = check_qwenvl_dataset(data, image_root=qwenvl_corpus / "img")
    assert report.problems == [] and report.samples_ok == 1


def test_report_json_and_truncated_text(qwenvl_corpus: Path) -> None:
    report = check_qwenvl_dataset(qwenvl_corpus / "train.jsonl")
    as_json = json.loads(json.dumps(report.to_json()))
    assert as_json["problem_count"] == len(report.problems) == 15
    assert sum(as_json["problem_counts"].values()) == 15
    assert as_json["problems"][0].keys() == {"file", "record", "kind", "what", "fix"}
    assert as_json["warning_counts"] == {"duplicate-sample": 1} and as_json["warnings"][0]["record"] == 15
    text = report.format_text(limit=5).splitlines()
    # The head that training prints reads the data file top to bottom.
    assert text[:5] == [str(problem) for problem in report.problems[:5]]
    assert [problem.record for problem in report.problems] == [*range(2, 15), 16, 17]
    assert text[5].startswith("... and 10 more")
    assert text[6] == f"warning: {report.warnings[0]}"
    assert text[8].startswith(f"qwenvl dataset {qwenvl_corpus}/train.jsonl: 3 samples ok, 15 problems (")
    assert text[8].endswith(", 1 warning (duplicate-sample 1)")


def test_problem_counts_are_most_frequent_first() -> None:
    problems = [
        Problem("a", kind, "what", "fix") for kind in ("b-kind", "a-kind", "a-kind", "c-kind", "c-kind")
    ]
    report = DataReport("sdxl", "a", 0, problems, {}, "")
    assert list(report.problem_counts().items()) == [("a-kind", 2), ("c-kind", 2), ("b-kind", 1)]


def test_token_length_histogram_bins_and_counts_over_length() -> None:
    text = token_length_histogram([100, 120, 300, 3000], max_length=2048)
    lines = text.splitlines()
    assert [line.split()[:2] for line in lines[1:-1]] == [
        ["65-128", "2"],
        ["257-512", "1"],
        ["2049-4096", "1"],
    ]
    assert "(1 over max_length 2048" in lines[-1]
