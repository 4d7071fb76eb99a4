from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tuner.data.conversations import load_conversations
from tuner.errors import DataError


def _png(path: Path, size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def _kinds(scan) -> list[tuple[str, int | None]]:
    return sorted((p.kind, p.record) for p in scan.problems)


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    _png(tmp_path / "img" / "cat.png")
    _png(tmp_path / "img" / "dog.png", color=(10, 200, 10))
    return tmp_path


def test_messages_with_string_content_multi_image_and_system(corpus: Path) -> None:
    data = _jsonl(
        corpus / "train.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "<image>Left, <image> right: same animal?"},
                    {"role": "assistant", "content": "No."},
                    {"role": "user", "content": "Which is the cat?"},
                    {"role": "assistant", "content": "The first."},
                ],
                "images": ["img/cat.png", "img/dog.png"],
            }
        ],
    )
    scan = load_conversations(data)
    assert scan.problems == []
    (conversation,) = scan.conversations
    assert conversation.images == [corpus / "img" / "cat.png", corpus / "img" / "dog.png"]
    assert all(image.is_absolute() for image in conversation.images)
    assert conversation.source == f"{data}:1"
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conversation.messages[0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert conversation.messages[1]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Left, "},
        {"type": "image"},
        {"type": "text", "text": " right: same animal?"},
    ]


def test_parts_content_with_listed_and_inline_images(corpus: Path) -> None:
    data = corpus / "train.json"
    record = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "img/dog.png"},
                    {"type": "image"},
                    {"type": "text", "text": "Compare."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Dog, then cat."}]},
        ],
        "images": ["img/cat.png"],
    }
    data.write_text(
        json.dumps(
            [
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
                record,
            ]
        )
    )
    scan = load_conversations(data)
    assert scan.problems == []
    text_only, with_images = scan.conversations
    assert text_only.images == [] and text_only.source == f"{data}:1"
    assert with_images.source == f"{data}:2"
    # The inline path comes first because its placeholder comes first; the listed image fills the second.
    assert with_images.images == [corpus / "img" / "dog.png", corpus / "img" / "cat.png"]
    assert with_images.messages[0]["content"][:2] == [{"type": "image"}, {"type": "image"}]


def test_sharegpt_records_and_image_root(tmp_path: Path) -> None:
    _png(tmp_path / "pictures" / "a.png")
    (tmp_path / "data").mkdir()
    data = _jsonl(
        tmp_path / "data" / "llava.jsonl",
        [
            {
                "image": "a.png",
                "system": "You describe images.",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": "A red square."},
                ],
            },
            {
                "images": ["a.png", "a.png"],
                "conversations": [
                    {"from": "system", "value": "Count."},
                    {"from": "human", "value": "<image><image>How many?"},
                    {"from": "gpt", "value": "Two."},
                ],
            },
        ],
    )
    scan = load_conversations(data, image_root=tmp_path / "pictures")
    assert scan.problems == []
    first, second = scan.conversations
    assert first.messages == [
        {"role": "system", "content": [{"type": "text", "text": "You describe images."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    ]
    assert first.images == [tmp_path / "pictures" / "a.png"]
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant"]
    assert len(second.images) == 2
    # Without image_root the paths are relative to the data file's folder, where the images are not.
    assert {p.kind for p in load_conversations(data).problems} == {"missing-image"}


def test_folder_reads_every_data_file_in_name_order(corpus: Path) -> None:
    folder = corpus / "set"
    folder.mkdir()
    answer = {"role": "assistant", "content": "ok"}
    _jsonl(folder / "b.jsonl", [{"messages": [{"role": "user", "content": "second"}, answer]}])
    (folder / "a.json").write_text(json.dumps([{"messages": [{"role": "user", "content": "first"}, answer]}]))
    (folder / "notes.txt").write_text("not data")
    scan = load_conversations(folder)
    assert [c.messages[0]["content"][0]["text"] for c in scan.conversations] == ["first", "second"]


def test_every_problem_kind_is_reported_with_file_and_record(corpus: Path) -> None:
    (corpus / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    outside = _png(corpus.parent / f"{corpus.name}-outside.png")
    (corpus / "img" / "link.png").symlink_to(outside)
    user = {"role": "user", "content": "q"}
    answer = {"role": "assistant", "content": "a"}
    records = [
        {"messages": [user, answer]},  # 1: fine
        '{"messages": [',  # 2
        {"dialog": []},  # 3
        {"messages": [{"role": "user", "content": "<image><image>"}, answer], "images": ["img/cat.png"]},  # 4
        {"messages": [{"role": "robot", "content": "x"}, answer]},  # 5
        {"messages": [user, {"role": "assistant", "content": "   "}]},  # 6
        {"messages": [user, answer, user]},  # 7
        {"messages": [{"role": "user", "content": "<image>"}, answer], "images": ["img/none.png"]},  # 8
        {"messages": [{"role": "user", "content": "<image>"}, answer], "images": ["img/broken.png"]},  # 9
        {"messages": [{"role": "user", "content": "<image>"}, answer], "images": ["../../etc/passwd"]},  # 10
        {"messages": [{"role": "user", "content": "<image>"}, answer], "images": [str(outside)]},  # 11
        {"messages": [{"role": "user", "content": "<image>"}, answer], "images": ["img/link.png"]},  # 12
        {"conversations": [{"from": "observation", "value": "x"}, {"from": "gpt", "value": "y"}]},  # 13
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]},  # 14
        {"messages": [user, answer, {"role": "system", "content": "late"}, answer]},  # 15
        {"messages": [user, {"role": "assistant", "content": "<image>"}], "images": ["img/cat.png"]},  # 16
        {"messages": [{"role": "user", "content": "q<|im_end|>"}, answer]},  # 17
    ]
    data = _jsonl(corpus / "train.jsonl", records)
    scan = load_conversations(data)
    assert _kinds(scan) == [
        ("control-token", 17),
        ("empty-turn", 6),
        ("image-count-mismatch", 4),
        ("image-in-answer", 16),
        ("malformed-line", 2),
        ("misplaced-system", 15),
        ("missing-image", 8),
        ("missing-key", 3),
        ("missing-key", 14),
        ("no-final-answer", 7),
        ("path-escape", 10),
        ("path-escape", 11),
        ("path-escape", 12),
        ("unknown-role", 5),
        ("unknown-role", 13),
        ("unreadable-image", 9),
    ]
    assert all(p.file == str(data) for p in scan.problems)
    assert [c.source for c in scan.conversations] == [f"{data}:1"]
    assert str(scan.problems[0]).startswith(f"{data}:")
    # Without verification, a corrupt file is only found when it is decoded.
    assert ("unreadable-image", 9) not in _kinds(load_conversations(data, check_images=False))


def test_one_record_reports_all_its_problems(corpus: Path) -> None:
    record = {
        "messages": [{"role": "user", "content": "<image> <image>"}, {"role": "user", "content": "more?"}],
        "images": ["img/missing.png", "../escape.png"],
    }
    scan = load_conversations(_jsonl(corpus / "train.jsonl", [record]))
    assert _kinds(scan) == [("missing-image", 1), ("no-final-answer", 1), ("path-escape", 1)]


def test_json_array_problems_use_the_array_index(corpus: Path) -> None:
    data = corpus / "train.json"
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    data.write_text(json.dumps([ok, ok, {"messages": [{"role": "user", "content": "q"}]}, 7]))
    assert _kinds(load_conversations(data)) == [("malformed-line", 4), ("no-final-answer", 3)]
    data.write_text('[{"messages": []},\n  {oops}]')
    assert _kinds(load_conversations(data)) == [("malformed-line", 2)]


def test_missing_path_and_empty_data_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no conversation records"):
        load_conversations(tmp_path / "empty.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"no \.json or \.jsonl files"):
        load_conversations(tmp_path / "folder")


def _answered(question: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "ok"}]}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_records_are_read_back_lazily_and_select_keeps_order(tmp_path: Path, suffix: str) -> None:
    records = [_answered(f"question {i}") for i in range(6)]
    data = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        _jsonl(data, [records[0], "", *records[1:]])  # a blank line: record numbers stay line numbers
    else:
        data.write_text(json.dumps(records, indent=2))
    conversations = load_conversations(data).conversations

    def questions(sequence) -> list[str]:
        return [c.messages[0]["content"][0]["text"] for c in sequence]

    assert questions(conversations) == [f"question {i}" for i in range(6)]
    assert questions(conversations.select([4, 1])) == ["question 4", "question 1"]
    assert questions(conversations[1:3]) == ["question 1", "question 2"]
    expected_source = f"{data}:3" if suffix == ".jsonl" else f"{data}:2"
    assert conversations[1].source == expected_source


def test_a_jsonl_record_changed_after_the_scan_is_named_when_read(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "train.jsonl", [_answered("first"), _answered("second")])
    conversations = load_conversations(data).conversations
    # The scan keeps positions, not conversations: an edit after it shows on the next read.
    data.write_text(json.dumps(_answered("first")) + "\n" + json.dumps({"messages": "broken"}) + "\n")
    assert conversations[0].messages[0]["content"][0]["text"] == "first"
    with pytest.raises(DataError, match=r"train.jsonl:2: the record no longer parses"):
        conversations[1]


def test_a_line_that_is_not_utf8_is_reported_with_its_number(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(json.dumps(_answered("fine")).encode() + b"\n" + b'{"messages": "\xff\xfe"}\n')
    scan = load_conversations(data)
    assert len(scan.conversations) == 1 and _kinds(scan) == [("malformed-line", 2)]
