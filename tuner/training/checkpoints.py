"""Checkpoints on disk: atomic (write to `.tmp-*`, rename), with a manifest, and pruned to the last K.

A checkpoint is complete when its `manifest.json` exists: the manifest is written last, after
every file it lists, and the folder only gets its `step-NNNNNN` name by an atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from tuner.atomic import give_default_modes
from tuner.errors import CheckpointError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_COMPLETE_NAME = re.compile(r"^step-(\d+)$")


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def temporary_checkpoint_dir(output_dir: Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f".tmp-{checkpoint_name(step)}"


def write_manifest(checkpoint_dir: Path, step: int) -> None:
    """List every file with its size and sha256; call after all other files are written.

    Every file is fsynced before the manifest that vouches for it: after a power loss a checkpoint
    with a manifest holds the bytes the manifest lists.
    """
    files = {}
    for path in sorted(p for p in checkpoint_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(checkpoint_dir).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": _sha256(path, sync=True),
        }
    manifest = checkpoint_dir / MANIFEST
    manifest.write_text(json.dumps({"step": step, "files": files}, indent=1))
    with open(manifest) as handle:
        os.fsync(handle.fileno())


def is_complete(checkpoint_dir: Path) -> bool:
    """The manifest parses and every file it lists exists with its recorded size (no hashing)."""
    try:
        manifest = json.loads((Path(checkpoint_dir) / MANIFEST).read_text())
        return all(
            (Path(checkpoint_dir) / name).stat().st_size == entry["size"]
            for name, entry in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify_manifest(checkpoint_dir: Path) -> None:
    """Raise CheckpointError unless every file in the manifest has its recorded sha256."""
    checkpoint_dir = Path(checkpoint_dir)
    if not is_complete(checkpoint_dir):
        raise CheckpointError(
            f"{checkpoint_dir}: not a complete checkpoint (no valid {MANIFEST}, or files missing)",
            hint="resume from another checkpoint, or use --resume latest to pick the newest complete one",
        )
    manifest = json.loads((checkpoint_dir / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        if _sha256(checkpoint_dir / name) != entry["sha256"]:
            raise CheckpointError(
                f"{checkpoint_dir / name}: contents differ from {MANIFEST} (corrupted or edited)",
                hint="resume from an earlier checkpoint",
            )


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _COMPLETE_NAME.match(path.name)) and is_complete(path)
    ]
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; `.tmp-*` leftovers of an interrupted save are ignored."""
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def partial_checkpoints(output_dir: Path) -> list[Path]:
    """`.tmp-*` folders left by a save that was interrupted (for the report; never resumed from)."""
    root = checkpoints_root(output_dir)
    return sorted(root.glob(".tmp-*")) if root.is_dir() else []


def resolve_resume(output_dir: Path, resume: str | Path) -> Path:
    """`latest` -> newest complete checkpoint under output_dir; a path -> that checkpoint, verified."""
    if str(resume) == "latest":
        candidates = complete_checkpoints(output_dir)
        if not candidates:
            raise CheckpointError(
                f"--resume latest: no complete checkpoint in {checkpoints_root(output_dir)}",
                hint="start without --resume, or point --output at the run to continue "
                "(checkpoints are written when output.checkpoint_every > 0)",
            )
        # Newest first; one whose files fail their checksums (a disk error, a partial copy) is
        # skipped with a warning, and the one before it resumes the run.
        for checkpoint in reversed(candidates[1:]):
            try:
                verify_manifest(checkpoint)
                return checkpoint
            except CheckpointError as error:
                logger.warning("--resume latest: skipping %s (%s)", checkpoint.name, error.message)
        checkpoint = candidates[0]
    else:
        checkpoint = Path(resume)
        if not checkpoint.is_dir():
            raise CheckpointError(
                f"--resume {resume}: no such checkpoint folder",
                hint=f"use --resume latest, or a folder under {checkpoints_root(output_dir)}",
            )
    verify_manifest(checkpoint)
    return checkpoint


def publish_checkpoint(temporary_dir: Path, step: int) -> Path:
    """Write the manifest into a fully written temporary folder and rename it into place."""
    write_manifest(temporary_dir, step)
    give_default_modes(temporary_dir)  # safetensors 0.8 writes its files private (0600)
    final = temporary_dir.parent / checkpoint_name(step)
    if final.exists():
        # Left by an earlier attempt of this run that was resumed from a checkpoint before it.
        shutil.rmtree(final)
    os.replace(temporary_dir, final)
    _sync_directory(final.parent)
    return final


def set_aside_later_checkpoints(output_dir: Path, checkpoint: Path) -> list[Path]:
    """Move the checkpoints after `checkpoint` (an abandoned timeline) into `checkpoints/abandoned-*/`.

    A run resumed from an older checkpoint starts a new timeline: the later checkpoints must not stay
    "latest" (`--resume latest` would jump back to them) nor count for retention (pruning keeps the
    highest steps and would delete the new timeline's checkpoint). They are kept, out of the way.
    Returns their new places.
    """
    match = _COMPLETE_NAME.match(Path(checkpoint).name)
    if match is None or Path(checkpoint).parent != checkpoints_root(output_dir):
        return []
    step = int(match.group(1))
    later = [path for path in complete_checkpoints(output_dir) if int(path.name.split("-")[1]) > step]
    if not later:
        return []
    aside = checkpoints_root(output_dir) / f"abandoned-after-{checkpoint_name(step)}"
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = aside.with_name(f"abandoned-after-{checkpoint_name(step)}-{suffix}")
    aside.mkdir()
    moved = []
    for path in later:
        os.replace(path, aside / path.name)
        moved.append(aside / path.name)
    return moved


def prune_checkpoints(output_dir: Path, keep: int, also_keep: int | None = None) -> list[Path]:
    """Delete all but the newest `keep` (at least 1) complete checkpoints and the one of step
    `also_keep` (output.keep_best's); returns what was deleted."""
    stale = [
        path
        for path in complete_checkpoints(output_dir)[: -max(keep, 1)]
        if also_keep is None or path.name != checkpoint_name(also_keep)
    ]
    for path in stale:
        shutil.rmtree(path)
    return stale


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _sync_directory(path: Path) -> None:
    """fsync a folder, so that a rename inside it survives a power loss."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
