"""The tiny Qwen-VL dataset is a task only the picture answers: one question for every picture, every
colour x shape in training, and held-out pictures that are new renders of them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tuner.tiny.datasets import (
    EVAL_FILE,
    HELD_OUT,
    QWENVL_COLOURS,
    QWENVL_QUESTION,
    QWENVL_SHAPES,
    build_tiny_dataset,
)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _picture_questions(records: list[dict]) -> list[dict]:
    return [r for r in records if len(r["messages"]) == 2 and r.get("images")]


def test_held_out_pictures_are_new_renders_of_the_trained_colours_and_shapes(tmp_path: Path) -> None:
    folder = build_tiny_dataset("qwenvl", tmp_path)
    train = _picture_questions(_records(folder / "train.jsonl"))
    held_out = _records(folder / HELD_OUT / EVAL_FILE)
    every_answer = {f"A {colour} {shape}." for colour, _ in QWENVL_COLOURS for shape in QWENVL_SHAPES}
    # The question never changes, so the text alone cannot tell one answer from another.
    assert {r["messages"][0]["content"] for r in train + held_out} == {f"<image>{QWENVL_QUESTION}"}
    assert {r["messages"][1]["content"] for r in train} == every_answer
    assert sorted(r["messages"][1]["content"] for r in held_out) == sorted(every_answer)

    def digest(root: Path, record: dict) -> str:
        return hashlib.sha256((root / record["images"][0]).read_bytes()).hexdigest()

    trained = {digest(folder, r) for r in train}
    assert len(trained) == len(train)  # every training picture differs (place and size)
    assert not trained & {digest(folder / HELD_OUT, r) for r in held_out}
