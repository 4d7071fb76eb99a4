"""Benchmark data sets are ones the recipes accept: distinct images, the length mix they claim."""

from __future__ import annotations

import hashlib
import json

from tuner.bench.qwenvl_bench import ANSWER_WORDS, IMAGE_SIZES, write_conversations
from tuner.bench.sdxl_shapes import write_captioned_images


def test_captioned_images_are_all_distinct_and_captioned(tmp_path):
    folder = write_captioned_images(tmp_path, count=12, resolution=32, seed=0)
    images = sorted(folder.glob("*.png"))
    assert len(images) == 12
    # Duplicates would train twice as often (and be warned about): every image is distinct.
    assert len({hashlib.sha256(path.read_bytes()).hexdigest() for path in images}) == 12
    assert all(path.with_suffix(".txt").read_text().strip() for path in images)


def test_conversations_mix_image_sizes_and_answer_lengths(tmp_path):
    data = write_conversations(tmp_path, count=200, seed=0)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(records) == 200
    sizes = {record["images"][0] for record in records}
    assert sizes == {f"images/{w}x{h}.png" for w, h in IMAGE_SIZES}
    answer_words = {len(record["messages"][1]["content"].split()) for record in records}
    assert answer_words == set(ANSWER_WORDS)
    assert all((tmp_path / image).is_file() for image in sizes)
