"""A dataset problem, reported the same way by training and by `tuner data check`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one sample: `file[:record]: what — fix`.

    `kind` is a short stable tag (`unreadable-image`, `missing-caption`, ...) used for counts.
    `record` is a 1-based line or record number inside `file`, when the file holds many samples.
    """

    file: str
    kind: str
    what: str
    fix: str
    record: int | None = None

    def __str__(self) -> str:
        where = self.file if self.record is None else f"{self.file}:{self.record}"
        return f"{where}: {self.what} — {self.fix}"
