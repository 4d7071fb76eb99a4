"""The library stack tuner runs on: installed versions, and combinations known not to work.

A run that would fail deep inside diffusers or transformers because two releases do not fit together
is stopped here, before any model is loaded, with the package to change. Each rule names the
releases it was measured with; lift it when a release that fixes it exists.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata

from packaging.version import InvalidVersion, Version

from tuner.errors import TunerError

logger = logging.getLogger(__name__)
# Set by `scripts/test.sh --latest`, which must see how the libraries themselves fail, not this guard.
IGNORE_VARIABLE = "TUNER_IGNORE_KNOWN_BREAKS"

# The distributions `tuner env` reports and the rules below read, by their PyPI names.
STACK = (
    "torch",
    "torchvision",
    "torch_npu",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "safetensors",
)


class StackError(TunerError):
    """Installed library versions that are known not to work together."""


@dataclass(frozen=True)
class KnownBreak:
    """A combination of releases that fails, with what to install instead."""

    name: str
    applies: Callable[[Mapping[str, Version | None]], bool]
    problem: Callable[[Mapping[str, Version | None]], str]
    fix: str


def _at_least(versions: Mapping[str, Version | None], package: str, release: str) -> bool:
    installed = versions.get(package)
    return installed is not None and installed.release >= Version(release).release


def _below(versions: Mapping[str, Version | None], package: str, release: str) -> bool:
    installed = versions.get(package)
    return installed is not None and installed.release < Version(release).release


def _torchvision_pairs_with_torch(versions: Mapping[str, Version | None]) -> bool:
    # torchvision 0.N is built for torch 2.(N-15): 0.29 <-> 2.14, 0.24 <-> 2.9, 0.19 <-> 2.4.
    torch, torchvision = versions.get("torch"), versions.get("torchvision")
    if torch is None or torchvision is None or torch.major != 2 or torchvision.major != 0:
        return True
    return torchvision.minor == torch.minor + 15


KNOWN_BREAKS = (
    KnownBreak(
        name="transformers >= 5.24 with peft < 0.22",
        # transformers 5.24's PEFT integration (load_adapter -> check_peft_version) refuses PEFT below
        # 0.22.0; on 2026-12-01 the newest PEFT release is 0.21.2. diffusers loads text-encoder LoRA
        # through that integration, so merge, infer and the text-encoder recipe fail.
        applies=lambda v: _at_least(v, "transformers", "5.24") and _below(v, "peft", "0.22"),
        problem=lambda v: (
            f"transformers {v['transformers']} loads LoRA only with peft >= 0.22, and peft {v['peft']} "
            "is installed: loading SDXL text-encoder LoRA, merge and infer fail"
        ),
        fix="pip install 'transformers>=5.23,<5.24' (the tested set: see requirements-lock.txt)",
    ),
    KnownBreak(
        name="torchvision built for another torch",
        applies=lambda v: not _torchvision_pairs_with_torch(v),
        problem=lambda v: (
            f"torchvision {v['torchvision']} is built for another torch than torch {v['torch']}: "
            "Qwen-VL processors fail to load ('operator torchvision::nms does not exist')"
        ),
        fix="install the pair together, e.g. pip install 'torch==2.14.1' 'torchvision==0.29.1'",
    ),
)


def installed_versions(packages: tuple[str, ...] = STACK) -> dict[str, str | None]:
    """The installed version of each package, None where it is not installed."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _parsed(versions: Mapping[str, str | None]) -> dict[str, Version | None]:
    parsed: dict[str, Version | None] = {}
    for package, text in versions.items():
        try:
            parsed[package] = Version(text) if text else None
        except InvalidVersion:
            parsed[package] = None
    return parsed


def stack_problems(versions: Mapping[str, str | None] | None = None) -> list[tuple[str, str]]:
    """(problem, fix) for every known-broken combination among `versions` (default: installed)."""
    parsed = _parsed(installed_versions() if versions is None else versions)
    return [(rule.problem(parsed), rule.fix) for rule in KNOWN_BREAKS if rule.applies(parsed)]


def check_stack(versions: Mapping[str, str | None] | None = None) -> None:
    """Raise StackError for the first known-broken combination (`tuner env` lists them all)."""
    problems = stack_problems(versions)
    if problems and os.environ.get(IGNORE_VARIABLE) == "1":
        for problem, _ in problems:
            logger.warning("%s=1: going on although %s", IGNORE_VARIABLE, problem)
        return
    if problems:
        problem, fix = problems[0]
        more = f" (and {len(problems) - 1} more: see `tuner env`)" if len(problems) > 1 else ""
        raise StackError(f"installed libraries do not work together: {problem}{more}", hint=fix)
