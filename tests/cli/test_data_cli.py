from __future__ import annotations

import json
from pathlib import Path

from cli_runner import run_cli
from PIL import Image


def captioned_folder(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True)
    for index, (name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (index * 40, 90, 200 - index * 40)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} shape")
    return folder


def test_clean_sdxl_dataset_exits_0_with_summary_and_buckets(capsys, tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "clean", {"wide": (128, 64), "square": (96, 96), "tall": (64, 128)})
    code, out, _ = run_cli(capsys, "data", "check", "sdxl", str(folder), "--batch-size", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"sdxl dataset {folder}: 3 samples ok, 0 problems"
    assert any(line.split()[:2] == ["1408x704", "1"] for line in lines)
    assert "fewer than batch size 2" in out


def test_dirty_sdxl_dataset_exits_1_and_lists_every_problem(capsys, tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "dirty", {"good": (96, 96), "small": (32, 32), "copy": (96, 96)})
    (folder / "copy.png").write_bytes((folder / "good.png").read_bytes())
    (folder / "broken.png").write_bytes(b"")
    (folder / "lonely.txt").write_text("no image")
    code, out, _ = run_cli(capsys, "data", "check", "sdxl", str(folder))
    assert code == 1
    problem_lines = out.split("\n\n")[0].splitlines()
    assert [line.split(":")[0] for line in problem_lines] == [
        str(folder / "broken.png"),  # no caption
        str(folder / "lonely.txt"),
        str(folder / "small.png"),
        "warning",  # good.png: same bytes as copy.png, which sorts first; both train
    ]
    assert problem_lines[-1].startswith(f"warning: {folder / 'good.png'}: image {folder / 'good.png'} has")
    assert f"sdxl dataset {folder}: 2 samples ok, 3 problems (" in out
    assert "1 warning (duplicate-image 1)" in out


def test_duplicates_alone_are_warnings_and_exit_0(capsys, tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "dups", {"a": (96, 96), "b": (96, 96)})
    (folder / "b.png").write_bytes((folder / "a.png").read_bytes())
    code, out, _ = run_cli(capsys, "data", "check", "sdxl", str(folder))
    assert code == 0
    assert out.startswith(f"warning: {folder / 'b.png'}: image {folder / 'b.png'} has the same content as")
    assert "2 samples ok, 0 problems, 1 warning (duplicate-image 1)" in out


def test_json_report_parses_and_counts_problems(capsys, tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "data", {"a": (96, 96), "b": (20, 96), "c": (10, 10)})
    (folder / "a.txt").write_text("")
    code, out, _ = run_cli(capsys, "data", "check", "sdxl", str(folder), "--json", "--min-size", "16")
    assert code == 1
    report = json.loads(out)
    assert report["problem_counts"] == {"empty-caption": 1, "too-small": 1}
    assert report["samples_ok"] == 1 and report["clean"] is False
    assert {problem["file"] for problem in report["problems"]} == {
        str(folder / "a.txt"),
        str(folder / "c.png"),
    }


def test_clean_qwenvl_dataset_has_a_token_length_histogram(capsys, tmp_path: Path, tiny_model) -> None:
    tiny_model("qwen2.5-vl")  # built once per test session; `--model tiny` finds it in TUNER_TINY_DIR
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "cat.png")
    record = {
        "messages": [
            {"role": "user", "content": "<image>What is this?"},
            {"role": "assistant", "content": "A red rectangle."},
        ],
        "images": ["cat.png"],
    }
    data = tmp_path / "train.jsonl"
    longer = {
        **record,
        "messages": [record["messages"][0], {"role": "assistant", "content": "A red box. " * 40}],
    }
    data.write_text(json.dumps(record) + "\n" + json.dumps(longer) + "\n")
    code, out, _ = run_cli(capsys, "data", "check", "qwenvl", str(data), "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["samples_ok"] == 2 and report["problems"] == []
    tokens = report["stats"]["tokens"]
    assert 0 < tokens["min"] < tokens["max"] < report["stats"]["max_length"]
    assert report["histogram"].splitlines()[-1].split()[:2] == ["total", "2"]
    # The pixel bounds reach the processor: a 64x48 image squeezed into 28x28 px is fewer image tokens.
    argv = ("data", "check", "qwenvl", str(data), "--json", "--min-pixels", "784", "--max-pixels", "784")
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and json.loads(out)["stats"]["tokens"]["max"] < tokens["max"]


def test_missing_path_is_a_user_error(capsys, tmp_path: Path) -> None:
    for kind in ("sdxl", "qwenvl"):
        code, _, err = run_cli(capsys, "data", "check", kind, str(tmp_path / "nowhere"))
        assert code == 2
        lines = err.strip().splitlines()
        assert lines[0].startswith("error: ") and "nowhere" in lines[0] and lines[1].startswith("hint: ")
        assert "Traceback" not in err


def test_option_for_the_other_recipe_is_a_usage_error(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "data", "check", "sdxl", str(tmp_path), "--image-root", "x")
    assert code == 2
    assert err.splitlines()[0] == "error: Invalid value: --image-root only apply to qwenvl datasets"


def test_processor_that_cannot_load_is_a_user_error(capsys, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
    )
    code, _, err = run_cli(
        capsys, "data", "check", "qwenvl", str(data), "--model", str(tmp_path / "no-model")
    )
    assert code == 2
    assert err.startswith(f"error: cannot load the processor of {tmp_path / 'no-model'}")
    assert "\nhint: " in err and "Traceback" not in err
