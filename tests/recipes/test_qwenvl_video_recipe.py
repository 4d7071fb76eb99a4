"""Videos through the CLI on every tiny family: `data check`, training on a mixed image + video dataset
(padded and packed, with a bad video skipped) and `infer --video`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import run_cli
from PIL import Image
from videos import write_frame_folder, write_video


def _dataset(folder: Path, broken: bool = False) -> Path:
    write_video(folder / "clip.mp4", frames=8, size=64, fps=4)
    write_frame_folder(folder / "frames", frames=4, size=48)
    Image.new("RGB", (40, 30), (250, 10, 10)).save(folder / "red.png")
    records = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": "clip.mp4"},
                        {"type": "text", "text": "What moves?"},
                    ],
                },
                {"role": "assistant", "content": "A red square."},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "<image><video>Same colour?"},
                {"from": "gpt", "value": "Yes."},
            ],
            "images": ["red.png"],
            "videos": ["frames"],
        },
        {
            "messages": [
                {"role": "user", "content": "<image>Colour?"},
                {"role": "assistant", "content": "Red."},
            ],
            "images": ["red.png"],
        },
    ]
    if broken:
        (folder / "broken.mp4").write_bytes(b"not a video")
        records.append(
            {
                "messages": [{"role": "user", "content": "<video>?"}, {"role": "assistant", "content": "x"}],
                "videos": ["broken.mp4"],
            }
        )
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records), encoding="utf-8")
    return path


def test_data_check_says_what_each_video_became(capsys, tmp_path) -> None:
    data = _dataset(tmp_path, broken=True)
    code, out, _ = run_cli(
        capsys, "data", "check", "qwenvl", str(data), "--model", "tiny-qwen2.5-vl", "--json"
    )
    report = json.loads(out)
    assert code == 1
    assert [problem["kind"] for problem in report["problems"]] == ["unreadable-video"]
    stats = report["stats"]
    assert stats["videos"] == 2
    assert stats["video_frames"] == {"min": 4, "median": 4, "max": 4}
    assert stats["video_tokens"]["min"] > 0
    # Training's video settings act in the check too.
    argv = (
        "data",
        "check",
        "qwenvl",
        str(data),
        "--model",
        "tiny-qwen2.5-vl",
        "--json",
        "--video-max-frames",
        "2",
    )
    _, out, _ = run_cli(capsys, *argv)
    fewer = json.loads(out)["stats"]
    assert fewer["video_frames"]["max"] == 2 and fewer["video_tokens"]["max"] < stats["video_tokens"]["max"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_mixed_image_and_video_data_trains_through_the_cli(capsys, tmp_path, model) -> None:
    data = _dataset(tmp_path, broken=True)
    output = tmp_path / "run"
    code, out, err = run_cli(
        capsys,
        *("train", "qwenvl-lora", "--preset", "tiny-cpu", "--model", model, "--data", str(data)),
        *("--output", str(output), "--max-steps", "2", "--set", "train.batch_size=2"),
        *("--set", "data.skip_bad=true", "--set", "data.max_bad_fraction=0.5", "--set", "data.packing=true"),
        *("--set", "data.video_max_frames=4", "--set", "lora.targets=[llm,vision]"),
    )
    assert code == 0, err
    assert (output / "adapter_model.safetensors").is_file()
    losses = [
        json.loads(line)["loss"]
        for line in (output / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert losses and all(loss == loss for loss in losses)  # finite, not NaN

    code, out, err = run_cli(
        capsys,
        *("infer", "qwenvl", "--adapter", str(output), "--video", str(tmp_path / "clip.mp4")),
        *("--prompt", "What moves?", "--max-new-tokens", "4", "--device", "cpu"),
    )
    assert code == 0, err
    assert out.strip()


def test_sdxl_refuses_the_video_keys(capsys, tmp_path) -> None:
    for key, value in (("data.video_fps", "1"), ("data.video_max_pixels", "1000000")):
        code, _, err = run_cli(
            capsys,
            *("train", "sdxl-lora", "--preset", "tiny-cpu", "--output", str(tmp_path / "o")),
            *("--set", f"{key}={value}"),
        )
        assert code == 2 and f"'{key}'" in err and "sdxl-lora does not use it" in err
