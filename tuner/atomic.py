"""Files written whole or not at all: a reader (a resumed run, a dataset scan, a browser) never sees half
a file, even when the writer is killed mid-write."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(temporary)`, then rename the temporary file onto `path` (`os.replace`, atomic on one
    file system). The temporary file is `.NAME.PID.tmp` beside `path`: hidden, so dataset scans and
    image counts skip it, and per process. It is removed when `write` fails. Not `mkstemp`, whose files
    are private (0600) and would stay so after the rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
