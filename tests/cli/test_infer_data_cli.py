"""`tuner infer qwenvl --data` asks each record what `tuner eval qwenvl` asks it, with the same reference:
boxes written in the family's convention, reasoning left out, videos shown with their frames."""

from __future__ import annotations

import json

from cli_runner import run_cli
from PIL import Image
from videos import write_frame_folder


def test_infer_data_references_are_the_final_answers_with_their_boxes(capsys, tmp_path) -> None:
    Image.new("RGB", (120, 90), (240, 240, 240)).save(tmp_path / "scene.png")
    write_frame_folder(tmp_path / "frames", frames=4, size=48)
    records = [
        {
            "messages": [
                {"role": "user", "content": "<image>Where is the cat?"},
                {"role": "assistant", "content": "<think>Not <box>, a shadow.</think>The cat: <box>"},
            ],
            "images": ["scene.png"],
            "boxes": [{"bbox": [5, 5, 30, 25], "label": "cat"}, {"bbox": [60, 40, 110, 85], "label": "cat"}],
        },
        {
            "conversations": [
                {"from": "human", "value": "<video>Which way?"},
                {"from": "gpt", "value": "Right."},
            ],
            "video": "frames",
        },
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    out = tmp_path / "answers.jsonl"
    code, _, err = run_cli(
        capsys,
        *("infer", "qwenvl", "--model", "tiny-qwen2-vl", "--data", str(data), "--out", str(out)),
        *("--device", "cpu", "--max-new-tokens", "3"),
    )
    assert code == 0, err
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    # Qwen2-VL: 0-1000 corners of the answer's own box, as an answer reads once its special tokens
    # (<|box_start|>...) are skipped in decoding.
    assert [a["reference"] for a in answers] == ["The cat: cat(500,444),(917,944)", "Right."]
    assert all(a["answer"] for a in answers)
