"""Outputs written whole or not at all, with the user's file modes.

Whole or not at all: a reader (a resumed run, a dataset scan, a browser, a server) never sees half a
file or folder, even when the writer is killed mid-write: everything is written under a hidden
temporary name beside the target and renamed onto it (`os.replace`, atomic on one file system).

The user's modes: safetensors 0.8 writes every file private (0600, through a temporary file of its own),
and `tempfile.mkdtemp` / `mkstemp` make private folders and files (0700 / 0600), so an adapter, kohya
file or merged model would be unreadable for a server running as another user (a container). Every
output gets the modes a plain `open()` / `mkdir()` would give it under the user's umask instead (0644 /
0755 with the usual 022), which `give_default_modes` sets and both writers here apply before the rename.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(temporary)`, then rename the temporary file onto `path`, flushed to disk and with the
    user's default file mode. The temporary file is `.NAME.PID.tmp` beside `path`: hidden, so dataset
    scans and image counts skip it, and per process. It is removed when `write` fails."""
    temporary = _temporary_name(Path(path))
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        give_default_modes(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return Path(path)


def write_folder_atomically(folder: Path, write: Callable[[Path], object], *, replace: bool = False) -> Path:
    """`write(staging)` into a new hidden folder `.NAME.PID.tmp` beside `folder`, give everything in it
    the user's default modes, then rename it onto `folder`. With `replace`, an existing `folder` is moved
    aside first and deleted once the new one is in place (put back if the rename fails). Without it the
    rename fails with OSError where a non-empty `folder` exists (another process may have won a race:
    the caller decides). Nothing but `folder` is left behind, whatever fails."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = _temporary_name(folder)
    aside = staging.with_name(staging.name + "-replaced")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed process that had this pid
    staging.mkdir()
    try:
        write(staging)
        give_default_modes(staging)
        if replace and folder.exists():
            os.replace(folder, aside)
        try:
            os.replace(staging, folder)
        except OSError:
            if aside.exists():
                os.replace(aside, folder)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
        elif aside.exists():
            aside.unlink()
    return folder


def give_default_modes(path: Path) -> Path:
    """Give `path` (and, for a folder, everything in it) the mode `open()` / `mkdir()` would have given
    it under the current umask: files 0666 & ~umask, folders 0777 & ~umask. For outputs written by
    libraries that make them private (safetensors 0.8's `save_file`, `save_pretrained`)."""
    path = Path(path)
    mask = current_umask()
    if path.is_dir():
        for root, folders, files in os.walk(path):
            for name in folders:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                if not os.path.islink(os.path.join(root, name)):  # its target is not ours to change
                    os.chmod(os.path.join(root, name), 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)
    return path


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (`os.umask` can only be read
    by setting it, which would race with threads creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
