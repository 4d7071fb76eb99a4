"""Grounding boxes: records carry boxes in pixels, the model sees them in its own family's convention.

A record lists its boxes once, in the pixels of the original images, and marks in the text where each
one goes::

    {"messages": [{"role": "user", "content": "<image>Where is the cat?"},
                  {"role": "assistant", "content": "It is here: <box>"}],
     "images": ["cat.jpg"],
     "boxes": [{"bbox": [40, 60, 200, 180], "label": "cat", "image": 0}]}

`bbox` is `[x1, y1, x2, y2]` in pixels of the image as it is displayed (EXIF orientation applied), x to
the right and y down, with `0 <= x1 < x2 <= width` and `0 <= y1 < y2 <= height`. `image` is the
0-based index of the image among the record's images (default 0), `label` names the object. Each
`<box>` in the text, in order over all turns, takes the next box; user turns may hold boxes too (a
region the question points at).

At encoding time each `<box>` becomes the box written the way the model's family was trained on:

* Qwen2-VL: `<|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>` with
  coordinates normalised to 0-1000 (`round(x / width * 1000)`);
* Qwen2.5-VL: `{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}` in absolute pixels of the image *after*
  the processor's resize (`smart_resize` with the run's pixel bounds), which is the image the model
  sees: `round(x * resized_width / width)`;
* Qwen3-VL: the same JSON object with coordinates relative to the image on a 0-1000 scale.

The family is read from the processor's class (`Qwen2VLProcessor`, `Qwen2_5_VLProcessor`,
`Qwen3VLProcessor`), so training, `tuner data check` and inference write the same text.
`parse_answer_boxes` reads both written forms back from a model's answer and maps them to pixels of
the input image (`tuner infer qwenvl --draw-boxes`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from PIL import Image, ImageDraw

from tuner.data.images import upright_size
from tuner.errors import DataError, ModelError

if TYPE_CHECKING:
    from tuner.data.conversations import Conversation

BOX_PLACEHOLDER = "<box>"
BoxStyle = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# Qwen2-VL and Qwen3-VL write coordinates on this scale, whatever the image size.
NORMALISED_SCALE = 1000
_PROCESSOR_STYLES: dict[str, BoxStyle] = {
    "Qwen2VLProcessor": "qwen2_vl",
    "Qwen2_5_VLProcessor": "qwen2_5_vl",
    "Qwen3VLProcessor": "qwen3_vl",
}
_QWEN2_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>)?"
    r"<\|box_start\|>\(\s*(?P<x1>-?\d+(?:\.\d+)?)\s*,\s*(?P<y1>-?\d+(?:\.\d+)?)\s*\)\s*,\s*"
    r"\(\s*(?P<x2>-?\d+(?:\.\d+)?)\s*,\s*(?P<y2>-?\d+(?:\.\d+)?)\s*\)<\|box_end\|>"
)
_JSON_BOX = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}")


@dataclass(frozen=True)
class Box:
    """One grounded object: `[x1, y1, x2, y2]` in pixels of image number `image` (0-based)."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str
    image: int = 0


def parse_box(entry: object) -> Box | str:
    """A record's `boxes` entry as a Box, or what is wrong with it."""
    if not isinstance(entry, dict):
        return "is not an object"
    bbox, label, image = entry.get("bbox"), entry.get("label", ""), entry.get("image", 0)
    if not (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
    ):
        return 'has no "bbox" of four numbers [x1, y1, x2, y2]'
    if not isinstance(label, str):
        return 'has a "label" that is not a string'
    if not isinstance(image, int) or isinstance(image, bool) or image < 0:
        return 'has an "image" that is not a 0-based image index'
    return Box(*(float(v) for v in bbox), label=label, image=image)


def box_problem(box: Box, width: int, height: int) -> str | None:
    """What is wrong with `box` on a `width` x `height` image: inverted, empty, or outside it."""
    if not (box.x1 < box.x2 and box.y1 < box.y2):
        return f"box {_shown(box)} is inverted or empty (needs x1 < x2 and y1 < y2)"
    if box.x1 < 0 or box.y1 < 0 or box.x2 > width or box.y2 > height:
        return f"box {_shown(box)} lies outside the {width}x{height} image"
    return None


def box_style(processor) -> BoxStyle:
    """How the processor's model family writes boxes."""
    style = _PROCESSOR_STYLES.get(type(processor).__name__)
    if style is None:
        raise ModelError(
            f"cannot write grounding boxes for a {type(processor).__name__}",
            hint="boxes need a Qwen2-VL, Qwen2.5-VL or Qwen3-VL processor (transformers' own classes)",
        )
    return style


def resized_size(processor, width: int, height: int) -> tuple[int, int]:
    """(width, height) the processor resizes a `width` x `height` image to, with its current pixel bounds."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    resized_height, resized_width = smart_resize(
        height,
        width,
        factor,
        min_pixels=image_processor.size["shortest_edge"],
        max_pixels=image_processor.size["longest_edge"],
    )
    return resized_width, resized_height


def model_coordinates(
    box: Box, style: BoxStyle, size: tuple[int, int], resized: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The box's corners as the family writes them, for an image of `size` resized to `resized`."""
    width, height = size
    if style == "qwen2_5_vl":
        sx, sy = resized[0] / width, resized[1] / height
    else:
        sx, sy = NORMALISED_SCALE / width, NORMALISED_SCALE / height
    return round(box.x1 * sx), round(box.y1 * sy), round(box.x2 * sx), round(box.y2 * sy)


def format_box(label: str, coordinates: tuple[int, int, int, int], style: BoxStyle) -> str:
    """The text the family writes for one box."""
    x1, y1, x2, y2 = coordinates
    if style == "qwen2_vl":
        return f"<|object_ref_start|>{label}<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    return json.dumps({"bbox_2d": [x1, y1, x2, y2], "label": label}, ensure_ascii=False)


def write_boxes(processor, conversation: Conversation) -> Conversation:
    """`conversation` with every `<box>` replaced by its box in the processor's family convention."""
    if not conversation.boxes:
        return conversation
    style = box_style(processor)
    written = []
    for box in conversation.boxes:
        path = conversation.images[box.image]
        try:
            size = upright_size(path)
        except DataError as error:
            raise DataError(f"{conversation.source}: {error.message}", hint=error.hint) from error
        written.append(
            format_box(box.label, model_coordinates(box, style, size, resized_size(processor, *size)), style)
        )
    remaining = iter(written)
    messages = []
    for message in conversation.messages:
        content = [
            {**part, "text": re.sub(re.escape(BOX_PLACEHOLDER), lambda _: next(remaining), part["text"])}
            if part["type"] == "text"
            else part
            for part in message["content"]
        ]
        messages.append({**message, "content": content})
    return replace(conversation, messages=messages, boxes=())


@dataclass(frozen=True)
class AnswerBox:
    """A box read from a model's answer, in pixels of the input image."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str


def parse_answer_boxes(
    answer: str, style: BoxStyle, size: tuple[int, int], resized: tuple[int, int]
) -> list[AnswerBox]:
    """Every box in `answer` (either written form), mapped back to pixels of a `size` image.

    Objects that do not parse (a model's half-written JSON) are skipped.
    """
    found: list[tuple[int, str, list[float]]] = []
    for match in _QWEN2_BOX.finditer(answer):
        corners = [float(match[name]) for name in ("x1", "y1", "x2", "y2")]
        found.append((match.start(), match["label"] or "", corners))
    for match in _JSON_BOX.finditer(answer):
        try:
            item = json.loads(match[0])
        except json.JSONDecodeError:
            continue
        corners = item.get("bbox_2d")
        if (
            isinstance(corners, list)
            and len(corners) == 4
            and all(isinstance(v, int | float) for v in corners)
        ):
            found.append((match.start(), str(item.get("label", "")), [float(v) for v in corners]))
    width, height = size
    if style == "qwen2_5_vl":
        sx, sy = width / resized[0], height / resized[1]
    else:
        sx, sy = width / NORMALISED_SCALE, height / NORMALISED_SCALE
    return [
        AnswerBox(x1 * sx, y1 * sy, x2 * sx, y2 * sy, label)
        for _, label, (x1, y1, x2, y2) in sorted(found, key=lambda item: item[0])
    ]


def draw_boxes(image: Image.Image, boxes: list[AnswerBox], out: Path) -> Path:
    """Write `image` with `boxes` outlined and labelled to `out` (any format PIL writes by extension)."""
    picture = image.convert("RGB")
    draw = ImageDraw.Draw(picture)
    line = max(1, round(min(picture.size) / 200))
    for box in boxes:
        draw.rectangle((box.x1, box.y1, box.x2, box.y2), outline=(255, 0, 0), width=line)
        if box.label:
            draw.text((box.x1 + line, box.y1 + line), box.label, fill=(255, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    return out


def _shown(box: Box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in (box.x1, box.y1, box.x2, box.y2)) + "]"
