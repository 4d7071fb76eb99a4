"""Compare the running environment with requirements-lock.txt, or list pyproject's requirement names.

python scripts/lock_diff.py requirements-lock.txt [--strict]   which packages differ from the lock
python scripts/lock_diff.py requirements-lock.txt --extras     installed packages the lock does not name
python scripts/lock_diff.py --requirement-names                 every dependency of tuner[dev], by name
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def canonicalize_name(name: str) -> str:
    # PEP 503 normalisation, written out: --requirement-names runs before packaging is installed.
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of a pip-freeze style lock file."""
    locked = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            locked[canonicalize_name(name)] = version.strip()
    return locked


def installed() -> dict[str, str]:
    return {
        canonicalize_name(dist.metadata["Name"]): dist.version
        for dist in metadata.distributions()
        if canonicalize_name(dist.metadata["Name"]) != "tuner"
    }


def requirement_names() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    # A bare regex, not packaging's parser: this runs before any dependency is installed.
    return sorted({re.match(r"[A-Za-z0-9._-]+", text).group() for text in requirements})


def main(argv: list[str]) -> int:
    if argv == ["--requirement-names"]:
        print(" ".join(requirement_names()))
        return 0
    lock, strict = Path(argv[0]), "--strict" in argv[1:]
    locked, present = read_lock(lock), installed()
    if "--extras" in argv[1:]:
        print(" ".join(sorted(set(present) - set(locked))))
        return 0
    moved = [
        f"  {name}: {locked.get(name, '-')} -> {present.get(name, '-')}"
        for name in sorted(set(locked) | set(present))
        if locked.get(name) != present.get(name)
    ]
    if not moved:
        print(f"setup: the environment is exactly {lock.name}")
        return 0
    print(f"setup: {len(moved)} package(s) differ from {lock.name} (locked -> installed):")
    print("\n".join(moved))
    return 1 if strict else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
