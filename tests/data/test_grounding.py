"""Grounding boxes: records in pixels, written per family (hand-computed), checked, read back and drawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tuner.data.conversations import load_conversations
from tuner.data.grounding import (
    Box,
    box_style,
    draw_boxes,
    format_box,
    model_coordinates,
    parse_answer_boxes,
    resized_size,
)
from tuner.data.vl_encoding import IGNORE_INDEX, encode_conversation, set_pixel_bounds, token_length

# A 100x90 image under a 96*96 pixel budget: Qwen2.5-VL's smart_resize (factor 28) makes it 84x84, so
# the resize changes the aspect (1.11 -> 1) and x and y scale differently (0.84 and 0.9333).
IMAGE_SIZE = (100, 90)
MAX_PIXELS = 96 * 96
BOX = [10, 20, 60, 80]
# Hand-computed: 0-1000 normalised: 10/100*1000, 20/90*1000 = 222.2, 60/100*1000, 80/90*1000 = 888.9.
# Qwen2.5-VL on the 84x84 resized image: 10*0.84 = 8.4, 20*84/90 = 18.7, 60*0.84 = 50.4, 80*84/90 = 74.7.
EXPECTED = {
    "qwen2-vl": "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,222),(600,889)<|box_end|>",
    "qwen2.5-vl": '{"bbox_2d": [8, 19, 50, 75], "label": "cat"}',
    "qwen3-vl": '{"bbox_2d": [100, 222, 600, 889], "label": "cat"}',
}


@pytest.fixture(scope="module", params=list(EXPECTED))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def processor(family, tiny_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model(family))
    set_pixel_bounds(processor, min_pixels=28 * 28, max_pixels=MAX_PIXELS)
    return processor


def _write(folder: Path, records: list[dict]) -> Path:
    Image.new("RGB", IMAGE_SIZE, (200, 200, 200)).save(folder / "scene.png")
    Image.new("RGB", (30, 40), (20, 20, 20)).save(folder / "small.png")
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records), encoding="utf-8")
    return path


def _record(boxes: list[dict], answer: str = "The cat: <box>", images=("scene.png",)) -> dict:
    return {
        "messages": [
            {"role": "user", "content": "<image>" * len(images) + "Where is the cat?"},
            {"role": "assistant", "content": answer},
        ],
        "images": list(images),
        "boxes": boxes,
    }


def test_each_family_writes_the_box_in_its_own_convention(family, processor, tmp_path) -> None:
    data = _write(tmp_path, [_record([{"bbox": BOX, "label": "cat"}])])
    scan = load_conversations(data)
    assert scan.problems == []
    conversation = scan.conversations[0]
    sample = encode_conversation(processor, conversation)
    supervised = sample.labels != IGNORE_INDEX
    reply = processor.tokenizer.decode(sample.labels[supervised])
    assert reply == f"The cat: {EXPECTED[family]}<|im_end|>"
    assert token_length(processor, conversation) == len(sample.input_ids)
    # The resize the Qwen2.5-VL coordinates are taken on is the processor's own: its image grid.
    _, grid_h, grid_w = sample.image_grid_thw[0].tolist()
    patch = processor.image_processor.patch_size
    assert resized_size(processor, *IMAGE_SIZE) == (grid_w * patch, grid_h * patch)


def test_qwen25_coordinates_follow_the_resize_not_the_original_pixels(tiny_model) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model("qwen2.5-vl"))
    set_pixel_bounds(processor, min_pixels=28 * 28, max_pixels=MAX_PIXELS)
    box = Box(*BOX, label="cat")
    assert resized_size(processor, *IMAGE_SIZE) == (84, 84)
    assert model_coordinates(box, "qwen2_5_vl", IMAGE_SIZE, (84, 84)) == (8, 19, 50, 75)
    # A larger pixel budget keeps the image larger, and the coordinates follow it.
    set_pixel_bounds(processor, min_pixels=28 * 28, max_pixels=200 * 200)
    assert resized_size(processor, *IMAGE_SIZE) == (112, 84)
    assert model_coordinates(box, "qwen2_5_vl", IMAGE_SIZE, (112, 84)) == (11, 19, 67, 75)


def test_box_in_a_user_turn_and_on_a_second_image(tmp_path) -> None:
    record = _record(
        [{"bbox": [0, 0, 30, 40], "label": "door", "image": 1}, {"bbox": BOX, "label": "cat"}],
        answer="<box> is left of the door",
        images=("scene.png", "small.png"),
    )
    record["messages"][0]["content"] = "<image><image>What is near <box>?"
    scan = load_conversations(_write(tmp_path, [record]))
    assert scan.problems == []
    conversation = scan.conversations[0]
    assert [box.image for box in conversation.boxes] == [1, 0]


@pytest.mark.parametrize(
    ("boxes", "answer", "kind", "words"),
    [
        ([{"bbox": [60, 20, 10, 80], "label": "cat"}], "<box>", "bad-box", "inverted"),
        ([{"bbox": [10, 20, 60, 91], "label": "cat"}], "<box>", "bad-box", "outside the 100x90 image"),
        ([{"bbox": [-1, 20, 60, 80], "label": "cat"}], "<box>", "bad-box", "outside"),
        ([{"bbox": [10, 20, 60], "label": "cat"}], "<box>", "bad-box", "four numbers"),
        ([{"bbox": BOX, "label": "cat", "image": 1}], "<box>", "bad-box", "refers to image 1"),
        ([{"bbox": BOX, "label": "cat"}], "no placeholder", "box-count-mismatch", "0 <box>"),
        ([], "<box>", "box-count-mismatch", "1 <box> placeholder(s) but 0"),
    ],
)
def test_data_check_refuses_bad_boxes(tmp_path, boxes, answer, kind, words) -> None:
    scan = load_conversations(_write(tmp_path, [_record(boxes, answer)]))
    assert len(scan.conversations) == 0
    assert [problem.kind for problem in scan.problems] == [kind]
    assert words in scan.problems[0].what and "data.jsonl" in scan.problems[0].file


def test_boxes_are_checked_on_the_upright_image(tmp_path) -> None:
    # Stored 90 wide and 100 high with EXIF orientation 6: displayed (and trained) as 100x90.
    image = Image.new("RGB", (90, 100), (200, 200, 200))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "scene.jpg", exif=exif)
    record = _record([{"bbox": [0, 0, 100, 90], "label": "all"}], images=("scene.jpg",))
    (tmp_path / "data.jsonl").write_text(json.dumps(record))
    assert load_conversations(tmp_path / "data.jsonl").problems == []


@pytest.mark.parametrize("style", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_answer_boxes_map_back_to_pixels_of_the_input_image(style) -> None:
    box = Box(*BOX, label="cat")
    written = format_box("cat", model_coordinates(box, style, IMAGE_SIZE, (84, 84)), style)
    answer = f"Here it is: {written} and nothing else."
    [found] = parse_answer_boxes(answer, style, IMAGE_SIZE, (84, 84))
    assert found.label == "cat"
    # Back within the rounding of one model coordinate.
    tolerance = 100 / 84 if style == "qwen2_5_vl" else 0.1
    assert [found.x1, found.y1, found.x2, found.y2] == pytest.approx(BOX, abs=tolerance)


def test_broken_json_boxes_are_skipped_and_the_rest_kept() -> None:
    answer = '[{"bbox_2d": [100, 100, 500, 500], "label": "a"}, {"bbox_2d": [1, 2, oops], "label": "b"}]'
    found = parse_answer_boxes(answer, "qwen3_vl", (200, 100), (200, 100))
    assert [(b.x1, b.y1, b.x2, b.y2, b.label) for b in found] == [(20, 10, 100, 50, "a")]


def test_drawn_boxes_land_on_the_box_edges(tmp_path) -> None:
    [found] = parse_answer_boxes(
        "<|box_start|>(100,222),(600,889)<|box_end|>", "qwen2_vl", IMAGE_SIZE, IMAGE_SIZE
    )
    out = draw_boxes(Image.new("RGB", IMAGE_SIZE, (255, 255, 255)), [found], tmp_path / "boxes.png")
    drawn = Image.open(out).convert("RGB")
    assert drawn.getpixel((10, 50)) == (255, 0, 0)  # left edge, x = 100/1000*100
    assert drawn.getpixel((35, 80)) == (255, 0, 0)  # bottom edge, y = 889/1000*90
    assert drawn.getpixel((35, 50)) == (255, 255, 255)  # inside


def test_a_processor_of_another_model_cannot_write_boxes() -> None:
    from tuner.errors import ModelError

    with pytest.raises(ModelError, match="grounding boxes"):
        box_style(object())


def test_data_check_reports_bad_boxes(tmp_path) -> None:
    from tuner.data.check import check_qwenvl_dataset

    data = _write(tmp_path, [_record([{"bbox": [10, 20, 160, 80], "label": "cat"}])])
    report = check_qwenvl_dataset(data)
    assert report.samples_ok == 0 and report.problem_counts() == {"bad-box": 1}
    assert "lies outside the 100x90 image" in report.format_text()
