"""Bad samples: refused before training, or skipped and logged, never a crash halfway through a run.

Before any model loads, a recipe hands its data check's report to `admit_dataset`: dirty data stops
the run with the head of the report (the whole report goes to `data_report.txt`), unless
`data.skip_bad` is on and at most `data.max_bad_fraction` of the samples are bad; then every skipped
sample is written to `skipped.jsonl` with the reason. A file that becomes unreadable after that check
(deleted or corrupted mid-run) is dropped from its batch by `SkipUnreadable` / `DropUnreadable` and
logged to the same file. Warnings (duplicate images or conversations) never stop a run: they are
printed before training starts, and the duplicates train like any other sample.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tuner.data.check import DataReport
from tuner.errors import DataError

REPORT_FILE = "data_report.txt"
SKIPPED_FILE = "skipped.jsonl"
PROBLEMS_SHOWN = 20
# What reading a sample raises when its file went missing or bad: the OS, Pillow (it raises
# SyntaxError for some broken PNG chunks) and our own loaders.
UNREADABLE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError, DataError)


def admit_dataset(
    report: DataReport, output_dir: Path, skip_bad: bool, max_bad_fraction: float, main_process: bool = True
) -> int:
    """Refuse the dataset, or accept it minus its bad samples; returns how many samples were skipped.

    The report's warnings are printed whatever happens to its problems. Every process of a run decides
    (so all stop or all go on), but only the main one prints and writes the report and the log: with
    N processes the user would otherwise read every line N times, and skipped.jsonl would hold N copies.
    """
    if main_process:
        for line in report.format_lines(report.warnings, PROBLEMS_SHOWN, "warning: "):
            print(line)
    if not report.problems:
        return 0
    output_dir = Path(output_dir)
    bad = len({(problem.file, problem.record) for problem in report.problems})
    bad_fraction = bad / (bad + report.samples_ok)
    if not skip_bad or bad_fraction > max_bad_fraction or report.samples_ok == 0:
        if main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / REPORT_FILE).write_text(report.format_text() + "\n", encoding="utf-8")
        if skip_bad:
            hint = (
                f"{bad} of {bad + report.samples_ok} samples ({bad_fraction:.1%}) are bad, more than "
                f"data.max_bad_fraction={max_bad_fraction:.1%}: fix the data, or raise --max-bad-fraction"
            )
        else:
            hint = (
                "fix them, or pass --skip-bad to train without them (allowed while at most "
                f"data.max_bad_fraction={max_bad_fraction:.0%} of the samples are bad)"
            )
        raise DataError(
            f"the training data has problems (full report: {output_dir / REPORT_FILE}):\n"
            + report.format_text(limit=PROBLEMS_SHOWN),
            hint=hint,
        )
    if not main_process:
        return bad
    log = SkippedLog(output_dir)
    for problem in report.problems:
        log.write(
            {
                "when": "data check",
                "file": problem.file,
                "record": problem.record,
                "kind": problem.kind,
                "why": f"{problem.what} — {problem.fix}",
            }
        )
    print(f"warning: skipping {bad} bad sample(s) of {bad + report.samples_ok}; each is listed in {log.path}")
    return bad


class SkippedLog:
    """Appends one JSON line per skipped sample to `output_dir/skipped.jsonl`."""

    def __init__(self, output_dir: Path) -> None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(output_dir) / SKIPPED_FILE

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class UnreadableSample:
    """Stands in for a sample whose file could not be read; `why` names the error (and so the file)."""

    index: int
    why: str


class SkipUnreadable(torch.utils.data.Dataset):
    """`dataset`, with a sample that fails to read returned as an `UnreadableSample`."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except UNREADABLE_ERRORS as error:
            return UnreadableSample(int(index), f"{type(error).__name__}: {error}")


class DropUnreadable:
    """A collate function that leaves unreadable samples out: (batch or None when all were, unreadable)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[Any]) -> tuple[Any, list[UnreadableSample]]:
        unreadable = [item for item in items if isinstance(item, UnreadableSample)]
        readable = [item for item in items if not isinstance(item, UnreadableSample)]
        return (self.collate_fn(readable) if readable else None), unreadable
