"""Small generated datasets for the tiny models: coloured shapes on plain backgrounds.

`--data tiny` resolves here, so the demo and the tests train on real files in the real layouts
(a kohya caption folder for SDXL, a JSONL of conversations for Qwen-VL) without any download.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from tuner.atomic import write_folder_atomically

DATASET_VERSION = 5
# SDXL's captioned shapes, (colour name, RGB, shape, width, height): mixed aspect ratios so bucketing has
# work to do.
_SHAPES = [
    ("red", (220, 30, 30), "square", 96, 96),
    ("blue", (30, 60, 220), "circle", 128, 96),
    ("green", (30, 180, 60), "triangle", 96, 128),
    ("yellow", (230, 210, 40), "square", 128, 64),
    ("purple", (140, 40, 180), "circle", 96, 96),
    ("orange", (240, 140, 20), "triangle", 64, 128),
    ("red", (220, 30, 30), "circle", 112, 80),
    ("blue", (30, 60, 220), "square", 80, 112),
]
# Qwen-VL's questions: one question for every picture, so only the picture tells the answer (the colour
# and shape of one shape, drawn at a size and offset from the centre picked at random). Training sees
# QWENVL_RENDERS pictures of each colour x shape; the held-out questions are one new picture of each, drawn
# from another seed (never byte-equal to a training picture). In a folder
# of their own, because a data folder trains on every JSON/JSONL file directly inside it.
QWENVL_QUESTION = "What is in the picture?"
QWENVL_COLOURS = [
    ("red", (220, 30, 30)),
    ("green", (30, 180, 60)),
    ("blue", (30, 60, 220)),
    ("yellow", (230, 210, 40)),
]
QWENVL_SHAPES = ("square", "circle", "triangle")
QWENVL_IMAGE_SIZE = 56
# Large shapes near the centre: a square fills the picture's corners, a circle none, a triangle the bottom
# two only, so the shapes differ in what each corner patch holds, which even a random vision tower keeps
# apart (at random places and sizes the tiny model learned the colour but not the shape). Side as a
# fraction of the picture, and how far (pixels) the centre moves.
_SIDE_MIN, _SIDE_MAX = 0.7, 0.9
_JITTER = 3.0
QWENVL_RENDERS = 8
_TRAIN_SEED, _HELD_OUT_SEED = 0, 1
# SDXL's trigger-word set (`--data tiny-trigger`): every picture is the one target colour, captioned with
# a made-up word the random base has never been taught, so what the adapter learns is that word -> colour.
TRIGGER_WORD = "zxq"
TRIGGER_COLOUR = (200, 40, 160)
# (width, height, caption) of each picture: mixed aspect ratios, as in the shapes set, and captions that
# vary around the trigger word.
_TRIGGER_PICTURES = [
    (64, 64, "a {word} picture"),
    (96, 64, "{word}"),
    (64, 96, "a {word} swatch"),
    (80, 80, "{word}, plain"),
]
HELD_OUT = "held-out"
EVAL_FILE = "eval.jsonl"


def resolve_tiny_dataset(path: str, task: str, root: Path | None = None) -> str:
    """`tiny` -> the generated dataset for the task (built once), `tiny-trigger` -> SDXL's trigger-word set;
    any other path is returned as is."""
    if path == "tiny-trigger" and task == "sdxl-lora":
        return str(build_tiny_dataset("sdxl-trigger", root))
    if path != "tiny":
        return path
    kind = "sdxl" if task == "sdxl-lora" else "qwenvl"
    return str(build_tiny_dataset(kind, root))


def resolve_tiny_eval_set(path: str, root: Path | None = None) -> str:
    """`tiny` -> the held-out questions of the generated Qwen-VL dataset; any other path as is."""
    return str(build_tiny_dataset("qwenvl", root) / HELD_OUT / EVAL_FILE) if path == "tiny" else path


def build_tiny_dataset(kind: str, root: Path | None = None) -> Path:
    """Build (once) and return the folder of a tiny dataset: `sdxl` (captions), `sdxl-trigger` (captions, one
    colour) or `qwenvl` (conversations)."""
    root = Path(root or os.environ.get("TUNER_TINY_DIR") or Path.home() / ".cache" / "tuner" / "tiny")
    target = root / f"dataset-{kind}-v{DATASET_VERSION}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    try:
        # Not mkdtemp: its folder is private (0700), and the dataset would stay so after the rename.
        write_folder_atomically(target, _WRITERS[kind])
    except OSError:
        # Another process finished the same build first; its copy is identical.
        if not target.is_dir():
            raise
    return target


def draw_shape(
    colour: tuple[int, int, int],
    shape: str,
    width: int,
    height: int,
    placement: tuple[float, float, float] | None = None,
) -> Image.Image:
    """One shape on a plain background: centred at 70 % of the short side, or at `placement` (left,
    top, side in pixels)."""
    image = Image.new("RGB", (width, height), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    if placement is None:
        side = min(width, height) * 0.7
        left, top = (width - side) / 2, (height - side) / 2
    else:
        left, top, side = placement
    box = (left, top, left + side, top + side)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(left, top + side), (left + side, top + side), (left + side / 2, top)], fill=colour)
    return image


def _write_sdxl(folder: Path) -> None:
    for index, (name, colour, shape, width, height) in enumerate(_SHAPES):
        stem = f"{index:02d}-{name}-{shape}"
        draw_shape(colour, shape, width, height).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"a {name} {shape}, plain background\n", encoding="utf-8")


def _write_sdxl_trigger(folder: Path) -> None:
    for index, (width, height, caption) in enumerate(_TRIGGER_PICTURES):
        stem = f"{index:02d}-{TRIGGER_WORD}"
        Image.new("RGB", (width, height), TRIGGER_COLOUR).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption.format(word=TRIGGER_WORD) + "\n", encoding="utf-8")


def _shape_questions(folder: Path, renders: int, seed: int, drawn: set[bytes]) -> list[dict]:
    """`renders` pictures of every colour x shape, each at a size and offset drawn from `seed`, none equal
    to a picture in `drawn` (which each new picture joins)."""
    (folder / "images").mkdir(parents=True)
    draw = random.Random(seed)
    size = QWENVL_IMAGE_SIZE
    records = []
    for render in range(renders):
        for name, colour in QWENVL_COLOURS:
            for shape in QWENVL_SHAPES:
                # Offsets of a few pixels can round to a picture already drawn: draw again.
                while True:
                    side = draw.uniform(_SIDE_MIN, _SIDE_MAX) * size
                    left, top = ((size - side) / 2 + draw.uniform(-_JITTER, _JITTER) for _ in range(2))
                    image = draw_shape(colour, shape, size, size, (left, top, side))
                    if image.tobytes() not in drawn:
                        break
                drawn.add(image.tobytes())
                image_name = f"images/{render}-{name}-{shape}.png"
                image.save(folder / image_name)
                records.append(
                    {
                        "messages": [
                            {"role": "user", "content": f"<image>{QWENVL_QUESTION}"},
                            {"role": "assistant", "content": f"A {name} {shape}."},
                        ],
                        "images": [image_name],
                    }
                )
    return records


def _write_qwenvl(folder: Path) -> None:
    drawn: set[bytes] = set()
    records = _shape_questions(folder, QWENVL_RENDERS, _TRAIN_SEED, drawn)
    # A text-only sample and a multi-turn one, so both paths are exercised by the demo.
    records.append(
        {
            "messages": [
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Red."},
            ]
        }
    )
    records.append(
        {
            "messages": [
                {"role": "system", "content": "You answer in three words or fewer."},
                {"role": "user", "content": "<image>What colour is the shape?"},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And its form?"},
                {"role": "assistant", "content": "A circle."},
            ],
            "images": ["images/0-blue-circle.png"],
        }
    )
    with open(folder / "train.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    held_out = folder / HELD_OUT
    held_out_records = _shape_questions(held_out, 1, _HELD_OUT_SEED, drawn)
    with open(held_out / EVAL_FILE, "w", encoding="utf-8") as handle:
        for record in held_out_records:
            handle.write(json.dumps(record) + "\n")


_WRITERS = {"sdxl": _write_sdxl, "sdxl-trigger": _write_sdxl_trigger, "qwenvl": _write_qwenvl}
