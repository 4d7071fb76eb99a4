"""Checkpoints on disk: atomic (write to `.tmp-*`, rename), with a manifest, and pruned to the last K.

A checkpoint is complete when its `manifest.json` exists: the manifest is written last, after
every file it lists, and the folder only gets its `step-NNNNNN` name by an atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from tuner.errors import CheckpointError

MANIFEST = "manifest.json"
_COMPLETE_NAME = re.compile(r"^step-(\d+)$")


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def temporary_checkpoint_dir(output_dir: Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f".tmp-{checkpoint_name(step)}"


def write_manifest(checkpoint_dir: Path, step: int) -> None:
    """List every file with its size and sha256; call after all other files are written."""
    files = {}
    for path in sorted(p for p in checkpoint_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(checkpoint_dir).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": _sha256(path),
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
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            raise CheckpointError(
                f"--resume latest: no complete checkpoint in {checkpoints_root(output_dir)}",
                hint="start without --resume, or point --output at the run to continue "
                "(checkpoints are written when output.checkpoint_every > 0)",
            )
        checkpoint = latest
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
    final = temporary_dir.parent / checkpoint_name(step)
    if final.exists():
        # Left by an earlier attempt of this run that was resumed from a checkpoint before it.
        shutil.rmtree(final)
    os.replace(temporary_dir, final)
    return final


def prune_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` (at least 1) complete checkpoints; returns what was deleted."""
    stale = complete_checkpoints(output_dir)[: -max(keep, 1)]
    for path in stale:
        shutil.rmtree(path)
    return stale


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
