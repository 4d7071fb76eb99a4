"""Qwen-VL conversation records: read, validate and normalise them without decoding images.

Two record formats are accepted, one record per JSONL line or per element of a JSON array:

* **messages** (the transformers chat format)::

      {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...], "images": ["a.png", ...]}

  `content` is a string, where each `<image>` marks where the next entry of `images` goes, or a list
  of parts: `{"type": "text", "text": "..."}` and `{"type": "image"}` (takes the next entry of
  `images`) or `{"type": "image", "image": "a.png"}` (an inline path; `"path"` works as the key too).

  Videos work the same way: `<video>` (or `{"type": "video"}`) takes the next entry of a `videos` list,
  `{"type": "video", "video": "clip.mp4"}` is inline. A video is a video file, a folder of frame images
  or a list of frame image paths (see tuner.data.video). Images and videos may mix.

* **conversations** (LLaVA / ShareGPT)::

      {"conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\nWhat is this?"}, ...],
       "image": "a.png"}            # or "images": ["a.png", ...]; "videos": ["clip.mp4", ...]

  `"user"` and `"assistant"` are accepted as `from` values too; tool roles (`observation`,
  `function_call`) are not.

Both formats may also carry a top-level `system` string (used when the turns have no system turn).
Every conversation becomes the messages format with list content; a system turn may only come
first, images may only appear outside assistant turns (their tokens would otherwise be supervised),
text may not contain Qwen chat-template markers such as `<|im_end|>`, and the last turn must be the
assistant's answer. Multi-turn, multi-image and text-only conversations are all fine.

Image (and video) paths are relative to `image_root` (default: the folder of the data file). Absolute
paths are accepted when they lie inside `image_root`. A path that leaves the root (`..`, an absolute path
elsewhere, a symlink pointing outside) is refused, so a dataset cannot make training read arbitrary
files.

Every problem in a record is reported (with the data file and the 1-based line or array index) and
the record is skipped; the caller decides whether to stop (see `tuner data check`). Problem kinds:
`malformed-line`, `missing-key`, `bad-type` (a key holds the wrong JSON type), `unknown-role`,
`misplaced-system`, `empty-turn`, `image-in-answer`, `control-token`, `no-final-answer`,
`image-count-mismatch`, `missing-image`, `unreadable-image` (only with `check_images`; PIL verify,
no decoding), `path-escape`, and for videos `video-in-answer`, `video-count-mismatch`, `missing-video`,
and (only with `check_images`: the file is probed and its first frame decoded) `unreadable-video`,
`empty-video` and `too-short-video`.
"""

from __future__ import annotations

import json
import os
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, overload

from tuner.data.grounding import BOX_PLACEHOLDER, Box, box_problem, parse_box
from tuner.data.images import DEFAULT_MAX_PIXELS, too_large_problem, upright_size
from tuner.data.problems import Problem
from tuner.data.thinking import THINK_CLOSE, THINK_OPEN, canonical_reply, split_reasoning
from tuner.data.video import VideoSampling, VideoSource, video_problem
from tuner.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
MEDIA_KINDS = ("image", "video")
DATA_SUFFIXES = (".json", ".jsonl")
CHAT_ROLES = ("system", "user", "assistant")
# Qwen chat-template markers: written inside a turn they would be read as real turn or image boundaries.
CONTROL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@dataclass(frozen=True)
class Conversation:
    """One training sample: chat messages with list content and the images and videos they point at."""

    messages: list[dict]
    images: list[Path]
    source: str
    # Grounding boxes, one per `<box>` in the text, in order (see tuner.data.grounding).
    boxes: tuple[Box, ...] = ()
    # "last": only the final reply is supervised (one sample per reply, see tuner.data.thinking).
    supervised_replies: Literal["all", "last"] = "all"
    # One per `{"type": "video"}` part, in order: a file, a folder of frames or a tuple of frame paths.
    videos: tuple[VideoSource, ...] = ()


def text_of(message: dict) -> str:
    """The text parts of a message (list content), joined."""
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


class ConversationRecords(Sequence[Conversation]):
    """The usable records of a scan, read back from their files when indexed: never loaded whole.

    Each record costs a few integers of memory (its file, where it starts, its record number), so a
    dataset of millions of conversations scans in constant memory; indexing re-reads and re-parses one
    record (JSONL: a seek and one line; a JSON array is held as compact bytes per record, since an
    array cannot be read piecewise). Images were checked during the scan and are not checked again.
    """

    def __init__(self, sources: list[_DataFile]) -> None:
        self._sources = sources
        self._file = array("i")
        self._position = array("q")  # JSONL: byte offset of the line; JSON array: index into its records
        self._record_number = array("q")

    def _add(self, file_index: int, position: int, record_number: int) -> None:
        self._file.append(file_index)
        self._position.append(position)
        self._record_number.append(record_number)

    def __len__(self) -> int:
        return len(self._file)

    @overload
    def __getitem__(self, index: int) -> Conversation: ...
    @overload
    def __getitem__(self, index: slice) -> ConversationRecords: ...
    def __getitem__(self, index: int | slice) -> Conversation | ConversationRecords:
        if isinstance(index, slice):
            return self.select(range(len(self))[index])
        source = self._sources[self._file[index]]
        record_number = self._record_number[index]
        parser = _RecordParser(source.path, record_number, source.image_root, False, {})
        conversation = parser.parse(source.record(self._position[index]))
        if conversation is None:
            # The scan accepted this record, so its file changed since.
            raise DataError(
                f"{source.path}:{record_number}: the record no longer parses ({parser.problems[0].what})",
                hint="the data changed after it was checked; restart the run",
            )
        return conversation

    def select(self, indices: Iterable[int]) -> ConversationRecords:
        """The records at `indices`, in that order, as another lazy sequence."""
        chosen = ConversationRecords(self._sources)
        for index in indices:
            chosen._add(self._file[index], self._position[index], self._record_number[index])
        return chosen


@dataclass
class _DataFile:
    """One data file of a scan and how to read a record of it back."""

    path: Path
    image_root: Path
    array_records: list[bytes] | None = None  # a JSON array's records, compact; None for JSONL

    def record(self, position: int) -> object:
        if self.array_records is not None:
            return json.loads(self.array_records[position])
        with self.path.open("rb") as handle:
            handle.seek(position)
            return json.loads(handle.readline())


@dataclass
class ConversationScan:
    """What a scan of a dataset produced: the usable conversations and every problem found."""

    conversations: ConversationRecords
    problems: list[Problem] = field(default_factory=list)


def load_conversations(
    path: str | Path,
    image_root: str | Path | None = None,
    check_images: bool = True,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> ConversationScan:
    """Scan every record under `path` (a .json/.jsonl file, or a folder of them, in name order).

    `check_images` also opens every image, refusing unreadable ones and those with more than
    `max_image_pixels` pixels (`data.max_image_pixels`, the decompression-bomb limit).

    Raises DataError when `path` does not exist or holds no records at all (nothing parsed and
    nothing wrong to report); otherwise bad records come back as problems. The conversations come
    back lazily (see ConversationRecords): only the problems are kept whole.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"data path {path} does not exist",
            hint="set data.path to a .json or .jsonl file of conversations, or a folder holding them",
        )
    if path.is_dir():
        data_files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    else:
        data_files = [path]
    sources: list[_DataFile] = []
    conversations = ConversationRecords(sources)
    scan = ConversationScan(conversations)
    image_checks: dict[Path, Problem | None] = {}
    for file_index, data_file in enumerate(data_files):
        root = Path(image_root) if image_root is not None else data_file.parent
        source = _DataFile(data_file, Path(os.path.abspath(root)))
        sources.append(source)
        for record_number, position, record, problem in _read_records(source):
            if problem is not None:
                scan.problems.append(problem)
                continue
            parser = _RecordParser(
                data_file, record_number, source.image_root, check_images, image_checks, max_image_pixels
            )
            conversation = parser.parse(record)
            scan.problems.extend(parser.problems)
            if conversation is not None:
                conversations._add(file_index, position, record_number)
    if not conversations and not scan.problems:
        where = f"{path} (no .json or .jsonl files in it)" if path.is_dir() and not data_files else str(path)
        raise DataError(
            f"no conversation records in {where}",
            hint="write one JSON object per line (.jsonl) or a JSON array of objects (.json), "
            'each with "messages" or "conversations"',
        )
    return scan


def _read_records(source: _DataFile) -> Iterator[tuple[int | None, int, object, Problem | None]]:
    """Yield `(record_number, position, record, problem)` for each record of a .json or .jsonl file.

    A JSONL file is read a line at a time (position: the line's byte offset); a JSON array is parsed
    whole and its records kept as compact bytes on `source` (position: the index among them).
    """
    data_file = source.path

    def malformed(what: str, fix: str, record: int | None = None) -> tuple[int | None, int, None, Problem]:
        return record, -1, None, Problem(str(data_file), "malformed-line", what, fix, record=record)

    if data_file.suffix.lower() == ".jsonl":
        try:
            handle = data_file.open("rb")
        except OSError as error:
            yield malformed(f"cannot read the file ({error})", "check the path and its permissions")
            return
        with handle:
            offset = 0
            for line_number, line in enumerate(handle, start=1):
                position, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                try:
                    yield line_number, position, json.loads(line.decode("utf-8")), None
                except UnicodeDecodeError:
                    yield malformed("the line is not UTF-8 text", "save the file as UTF-8", line_number)
                except json.JSONDecodeError as error:
                    what = f"not valid JSON ({error.msg} at column {error.colno})"
                    yield malformed(what, "write one complete JSON object per line", line_number)
        return
    try:
        text = data_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        yield malformed(f"cannot read the file ({error})", "save it as UTF-8 text")
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        what = f"not valid JSON ({error.msg} at line {error.lineno})"
        fix = "fix the JSON syntax (a .json file holds one array of records; use .jsonl for one per line)"
        yield malformed(what, fix, error.lineno)
        return
    del text
    if not isinstance(records, list):
        what = f"the top level is a JSON {type(records).__name__}, not an array"
        yield malformed(what, "put the records in a JSON array: [{...}, {...}]")
        return
    source.array_records = []
    for index, record in enumerate(records, start=1):
        source.array_records.append(json.dumps(record, separators=(",", ":")).encode())
        yield index, index - 1, record, None


class _RecordParser:
    """Turns one record into a Conversation, collecting every problem it finds along the way."""

    def __init__(
        self,
        data_file: Path,
        record_number: int,
        image_root: Path,
        check_images: bool,
        image_checks: dict[Path, Problem | None],
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.data_file = data_file
        self.record_number = record_number
        self.image_root = image_root
        self.check_images = check_images
        self.image_checks = image_checks
        self.max_image_pixels = max_image_pixels
        self.problems: list[Problem] = []

    def report(self, kind: str, what: str, fix: str) -> None:
        self.problems.append(Problem(str(self.data_file), kind, what, fix, record=self.record_number))

    def parse(self, record: object) -> Conversation | None:
        if not isinstance(record, dict):
            self.report(
                "malformed-line",
                f"the record is a JSON {type(record).__name__}, not an object",
                'write each record as an object with "messages" or "conversations"',
            )
            return None
        if "messages" in record:
            turns = self._messages_turns(record["messages"])
        elif "conversations" in record:
            turns = self._sharegpt_turns(record["conversations"])
        else:
            self.report(
                "missing-key",
                'the record has neither "messages" nor "conversations"',
                'add "messages" (role/content) or "conversations" (from/value)',
            )
            return None
        listed_images = self._listed_images(record)
        listed_videos = self._listed_videos(record)
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            self.report("bad-type", '"system" is not a string', "write the system prompt as a string")
        if turns is None or self.problems:
            return None
        if isinstance(system, str) and system.strip() and (not turns or turns[0]["role"] != "system"):
            turns.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        self._check_turn_order(turns)
        self._normalise_reasoning(turns)
        # Images are checked even when the turn order is wrong, so one pass reports both.
        image_paths = self._assign_media(turns, listed_images, "image") or []
        images = [self._checked_image(image) for image in image_paths]
        video_sources = self._assign_media(turns, listed_videos, "video") or []
        videos = [self._checked_video(video) for video in video_sources]
        boxes = self._boxes(record.get("boxes", []), turns, images)
        if self.problems:
            return None
        messages = [{"role": turn["role"], "content": turn["content"]} for turn in turns]
        return Conversation(
            messages=messages,
            images=images,
            source=f"{self.data_file}:{self.record_number}",
            boxes=tuple(boxes),
            videos=tuple(videos),
        )

    def _messages_turns(self, messages: object) -> list[dict] | None:
        if not isinstance(messages, list):
            self.report(
                "bad-type", '"messages" is not a list', 'write "messages" as a list of {role, content}'
            )
            return None
        turns = []
        for number, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                self.report(
                    "missing-key",
                    f'message {number} lacks "role" or "content"',
                    'give every message a "role" and a "content"',
                )
                continue
            role = message["role"]
            if role not in CHAT_ROLES:
                self.report(
                    "unknown-role",
                    f"message {number} has role {role!r}",
                    f"use one of {', '.join(CHAT_ROLES)}",
                )
                continue
            content = self._content_parts(message["content"], f"message {number}")
            if content is not None:
                reasoning = message.get("reasoning_content", message.get("reasoning"))
                turns.append({"role": role, "content": content, "number": number, "reasoning": reasoning})
        return turns

    def _sharegpt_turns(self, conversations: object) -> list[dict] | None:
        if not isinstance(conversations, list):
            self.report(
                "bad-type",
                '"conversations" is not a list',
                'write "conversations" as a list of {from, value}',
            )
            return None
        turns = []
        for number, turn in enumerate(conversations, start=1):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                self.report(
                    "missing-key",
                    f'turn {number} lacks "from" or "value"',
                    'give every turn a "from" and a "value"',
                )
                continue
            role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
            if role is None:
                self.report(
                    "unknown-role",
                    f"turn {number} is from {turn['from']!r}",
                    f"use one of {', '.join(SHAREGPT_ROLES)}",
                )
                continue
            if not isinstance(turn["value"], str):
                self.report(
                    "bad-type", f'turn {number} has a non-string "value"', "write the turn as a string"
                )
                continue
            content = _split_placeholders(turn["value"])
            reasoning = turn.get("reasoning_content", turn.get("reasoning"))
            turns.append({"role": role, "content": content, "number": number, "reasoning": reasoning})
        return turns

    def _content_parts(self, content: object, where: str) -> list[dict] | None:
        if isinstance(content, str):
            return _split_placeholders(content)
        if not isinstance(content, list):
            self.report(
                "bad-type",
                f"{where} content is neither a string nor a list of parts",
                'write content as a string or as [{"type": "text", "text": ...}, {"type": "image"}]',
            )
            return None
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in MEDIA_KINDS:
                inline = part.get(kind, part.get("path"))
                if inline is not None and not _is_media_path(inline, kind):
                    self.report(
                        "bad-type",
                        f"{where} has an {kind} part whose path is not a string"
                        + (" or a list of frame paths" if kind == "video" else ""),
                        f'write inline {kind}s as {{"type": "{kind}", "{kind}": "relative/path"}}',
                    )
                    return None
                parts.append({"type": kind, "path": inline} if inline else {"type": kind})
            elif kind == "text":
                self.report(
                    "missing-key",
                    f'{where} has a text part without a string "text"',
                    'write text parts as {"type": "text", "text": "..."}',
                )
                return None
            else:
                self.report(
                    "missing-key",
                    f'{where} has a part without type "text", "image" or "video"',
                    'give every part "type": "text", "image" or "video"',
                )
                return None
        return parts

    def _listed_images(self, record: dict) -> list[str] | None:
        listed = record.get("images", record.get("image", []))
        if isinstance(listed, str):
            listed = [listed]
        if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
            self.report(
                "bad-type",
                '"images" is not a list of paths',
                'write "images" as a list of path strings (or "image" as one string)',
            )
            return None
        return listed

    def _listed_videos(self, record: dict) -> list[str | list[str]] | None:
        listed = record.get("videos", record.get("video", []))
        if isinstance(listed, str):
            listed = [listed]
        if not isinstance(listed, list) or not all(_is_media_path(item, "video") for item in listed):
            self.report(
                "bad-type",
                '"videos" is not a list of paths',
                'write "videos" as a list of video files, frame folders or lists of frame paths',
            )
            return None
        return listed

    def _check_turn_order(self, turns: list[dict]) -> None:
        for index, turn in enumerate(turns):
            label = f"{'message' if 'number' in turn else 'turn'} {turn.get('number', index + 1)}"
            if turn["role"] == "system" and index > 0:
                self.report(
                    "misplaced-system",
                    f"{label} is a system turn after the first turn",
                    "put the system prompt first, or merge it into a user turn",
                )
            text = "".join(part["text"] for part in turn["content"] if part["type"] == "text")
            has_image = any(part["type"] == "image" for part in turn["content"])
            has_video = any(part["type"] == "video" for part in turn["content"])
            if not text.strip() and not has_image and not has_video:
                self.report(
                    "empty-turn", f"{label} ({turn['role']}) is empty", "remove the turn or give it text"
                )
            if control := next((token for token in CONTROL_TOKENS if token in text), None):
                self.report(
                    "control-token",
                    f"{label} contains the chat-template marker {control}",
                    "remove it from the text (images are marked with <image> or an image part)",
                )
            if turn["role"] == "assistant" and has_image:
                self.report(
                    "image-in-answer",
                    f"{label} is an assistant turn holding an image",
                    "move the image into the user turn before it",
                )
            if turn["role"] == "assistant" and has_video:
                self.report(
                    "video-in-answer",
                    f"{label} is an assistant turn holding a video",
                    "move the video into the user turn before it",
                )
        if not turns or turns[-1]["role"] != "assistant":
            self.report(
                "no-final-answer",
                "the conversation does not end with an assistant turn",
                "end every conversation with the answer the model should learn",
            )

    def _normalise_reasoning(self, turns: list[dict]) -> None:
        """Put each reply's reasoning (a `reasoning_content`/`reasoning` field or an opening `<think>`
        block) into the canonical `<think>` form of tuner.data.thinking."""
        for index, turn in enumerate(turns):
            label = f"message {turn.get('number', index + 1)}"
            reasoning = turn.get("reasoning")
            if turn["role"] != "assistant":
                if reasoning is not None:
                    self.report(
                        "misplaced-reasoning",
                        f"{label} ({turn['role']}) carries reasoning",
                        "only assistant replies carry reasoning_content",
                    )
                continue
            if reasoning is not None and not isinstance(reasoning, str):
                self.report("bad-type", f"{label} has a non-string reasoning", "write reasoning as a string")
                continue
            if any(part["type"] != "text" for part in turn["content"]):
                continue  # image-in-answer, reported by the turn-order check
            text = "".join(part["text"] for part in turn["content"])
            fix = "open the reply with one <think>...</think> block, or use a reasoning_content field"
            try:
                inline, answer = split_reasoning(text)
            except ValueError as error:
                self.report("bad-reasoning", f"{label}: {error}", fix)
                continue
            if inline is not None and reasoning is not None:
                self.report("bad-reasoning", f"{label} has both a <think> block and a reasoning field", fix)
                continue
            if inline is None and reasoning is None:
                continue
            if THINK_CLOSE in answer or THINK_OPEN in answer:
                self.report("bad-reasoning", f"{label} has a <think> block after the reasoning", fix)
                continue
            reasoning = inline if inline is not None else reasoning
            turn["content"] = [{"type": "text", "text": canonical_reply(reasoning, answer)}]

    def _boxes(self, entries: object, turns: list[dict], images: list[Path]) -> list[Box]:
        """The record's grounding boxes, checked against the `<box>` placeholders and the images."""
        if not isinstance(entries, list):
            self.report(
                "bad-type", '"boxes" is not a list', 'write "boxes" as a list of {bbox, label, image}'
            )
            return []
        placeholders = sum(
            part["text"].count(BOX_PLACEHOLDER)
            for turn in turns
            for part in turn["content"]
            if part["type"] == "text"
        )
        if placeholders != len(entries):
            self.report(
                "box-count-mismatch",
                f"{placeholders} {BOX_PLACEHOLDER} placeholder(s) but {len(entries)} listed box(es)",
                f"put one {BOX_PLACEHOLDER} in the text per entry of boxes, in order",
            )
            return []
        boxes = []
        for number, entry in enumerate(entries, start=1):
            box = parse_box(entry)
            if isinstance(box, str):
                self.report(
                    "bad-box", f"box {number} {box}", 'write {"bbox": [x1, y1, x2, y2], "label": "..."}'
                )
                continue
            if box.image >= len(images):
                self.report(
                    "bad-box",
                    f"box {number} refers to image {box.image} but the record has {len(images)} image(s)",
                    '"image" is the 0-based index of the image the box lies on',
                )
                continue
            try:
                size = upright_size(images[box.image])
            except DataError:  # a missing or unreadable image is reported by the image checks
                size = None
            problem = box_problem(box, *size) if size is not None else None
            if problem is not None:
                self.report(
                    "bad-box",
                    f"box {number}: {problem}",
                    "give bbox in pixels of the original image (EXIF rotation applied), x1 < x2, y1 < y2",
                )
                continue
            boxes.append(box)
        return boxes

    def _assign_media(self, turns: list[dict], listed: list | None, kind: str) -> list | None:
        """Give each image (or video) placeholder its path, in order; inline paths don't use up the
        record's `images` (`videos`)."""
        if listed is None:
            return None
        placeholders = [part for turn in turns for part in turn["content"] if part["type"] == kind]
        without_path = sum(1 for part in placeholders if "path" not in part)
        if without_path != len(listed):
            self.report(
                f"{kind}-count-mismatch",
                f"{without_path} {kind} placeholder(s) but {len(listed)} listed {kind}(s)",
                f'put one <{kind}> (or {{"type": "{kind}"}}) per listed {kind}, in order',
            )
            return None
        remaining = iter(listed)
        return [part.pop("path") if "path" in part else next(remaining) for part in placeholders]

    def _checked_video(self, entry: str | list[str]) -> VideoSource:
        """A video file or frame folder (a path), or a frame list (a tuple of paths), checked like images."""
        before = len(self.problems)
        relatives = [entry] if isinstance(entry, str) else entry
        paths = [self._inside_root(relative, "video") for relative in relatives]
        source: VideoSource = paths[0] if isinstance(entry, str) else tuple(paths)
        if len(self.problems) > before:
            return source
        missing = next((path for path in paths if not path.exists()), None)
        if missing is not None:
            self.report(
                "missing-video",
                f"video {os.path.relpath(missing, self.image_root)!r} not found at {missing}",
                "fix the path or set data.image_root to the folder the paths are relative to",
            )
        elif self.check_images:
            problem = video_problem(source, VideoSampling())
            if problem is not None:
                name = os.path.relpath(problem.file, self.image_root)
                where = {"file": str(self.data_file), "record": self.record_number}
                self.problems.append(replace(problem, **where, what=f"video {name!r}: {problem.what}"))
        return source

    def _inside_root(self, relative: str, kind: str) -> Path:
        """`relative` under the image root; reports a path that leaves it (also through a link)."""
        path = Path(os.path.normpath(self.image_root / relative))
        if not path.is_relative_to(self.image_root) or (
            path.exists() and not path.resolve().is_relative_to(self.image_root.resolve())
        ):
            self.report(
                "path-escape",
                f"{kind} {relative!r} lies outside the image root {self.image_root}",
                "keep images and videos under data.image_root (relative paths without `..`)",
            )
        return path

    def _checked_image(self, relative: str) -> Path:
        # Lexical normalisation first: `..` must not walk out of the root even through a missing folder.
        image = Path(os.path.normpath(self.image_root / relative))
        if not image.is_relative_to(self.image_root):
            self.report(
                "path-escape",
                f"image {relative!r} lies outside the image root {self.image_root}",
                "keep images under data.image_root (relative paths without `..`)",
            )
            return image
        if image in self.image_checks:
            problem = self.image_checks[image]
            if problem is not None:
                self.problems.append(replace(problem, file=str(self.data_file), record=self.record_number))
            return image
        problem = self._image_problem(image, relative)
        self.image_checks[image] = problem
        if problem is not None:
            self.problems.append(problem)
        return image

    def _image_problem(self, image: Path, relative: str) -> Problem | None:
        def problem(kind: str, what: str, fix: str) -> Problem:
            return Problem(str(self.data_file), kind, what, fix, record=self.record_number)

        if not image.exists():
            return problem(
                "missing-image",
                f"image {relative!r} not found at {image}",
                "fix the path or set data.image_root to the folder the paths are relative to",
            )
        if not image.resolve().is_relative_to(self.image_root.resolve()):
            return problem(
                "path-escape",
                f"image {relative!r} is a link to {image.resolve()}, outside "
                f"the image root {self.image_root}",
                "copy the image into the image root",
            )
        if self.check_images:
            from PIL import Image

            too_large = too_large_problem(image, self.max_image_pixels)
            if too_large is not None:
                return problem(too_large.kind, f"image {relative!r}: {too_large.what}", too_large.fix)
            try:
                with Image.open(image) as opened:
                    opened.verify()
            # PIL reports corrupt or unknown files with many exception types (OSError, SyntaxError,
            # ValueError, struct.error, DecompressionBombError...), so any failure counts as unreadable.
            except Exception as error:
                return problem(
                    "unreadable-image",
                    f"image {relative!r} cannot be read ({error})",
                    "re-save it as PNG/JPEG/WebP or remove the record",
                )
        return None


def _split_placeholders(text: str) -> list[dict]:
    """`"<image>\\nWhat?"` -> `[{"type": "image"}, {"type": "text", "text": "\\nWhat?"}]`, text kept as is;
    `<video>` likewise becomes `{"type": "video"}`."""
    parts: list[dict] = []
    for piece in _PLACEHOLDERS.split(text):
        if piece == IMAGE_PLACEHOLDER:
            parts.append({"type": "image"})
        elif piece == VIDEO_PLACEHOLDER:
            parts.append({"type": "video"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _is_media_path(value: object, kind: str) -> bool:
    """A path string, or for a video also a non-empty list of frame path strings."""
    if isinstance(value, str):
        return True
    return (
        kind == "video" and isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    )
