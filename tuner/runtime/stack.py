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
        # 0.22.0 (measured 2026-12-01, when 0.21.2 was the newest PEFT). diffusers loads text-encoder
        # LoRA through that integration, so merge, infer and the text-encoder recipe fail. Measured
        # 2026-12-07: peft 0.22.0 is released and the suite passes on transformers 5.25.0 + peft 0.22.0
        # + accelerate 1.16.0 (the lock), so the fix is the newer peft, not an older transformers.
        applies=lambda v: _at_least(v, "transformers", "5.24") and _below(v, "peft", "0.22"),
        problem=lambda v: (
            f"transformers {v['transformers']} loads LoRA only with peft >= 0.22, and peft {v['peft']} "
            "is installed: loading SDXL text-encoder LoRA, merge and infer fail"
        ),
        fix="pip install 'peft>=0.22' (the tested set: see requirements-lock.txt)",
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


@dataclass(frozen=True)
class AscendTrio:
    """A torch_npu release with the torch (and torchvision) it pins and the CANN it runs on."""

    torch_npu: str
    torch: str
    torchvision: str
    cann: str
    # What installs it: the constraint set or the container image.
    source: str


# torch_npu pins torch exactly (its wheel's Requires-Dist), so the lock's torch (2.14.1) has no torch_npu:
# the Ascend constraint set (constraints-ascend.txt) swaps the lock's torch pair for a trio's.
# Read 2026-12-07; none of these has run on Ascend hardware from this project.
ASCEND_TRIOS = (
    AscendTrio(
        torch_npu="2.14.0",
        torch="2.14.0",
        torchvision="0.29.0",
        cann="9.1.0",
        # PyPI torch-npu 2.14.0: `Requires-Dist: torch==2.14.0.*`. Ascend's compatibility table has no
        # row for it yet (its newest row is 2.12.0); CANN 9.1.0 is what the wheel's README installs and
        # the newest CANN its code tests for (`_is_gte_cann_version("9.1.0")`).
        source="constraints-ascend.txt",
    ),
    AscendTrio(
        torch_npu="2.12.0",
        torch="2.12.0",
        torchvision="0.27.0",
        cann="9.1.0",
        # A row of Ascend/pytorch COMPATIBILITY.md (TorchNPU 26.1.0).
        source="Dockerfile.ascend",
    ),
)
# The trio the Ascend constraint set installs.
PIP_ASCEND_TRIO = ASCEND_TRIOS[0]
# Lock lines that are not for an Ascend host: the CUDA build of torch and its CUDA wheels, and pip's own.
_NOT_FOR_ASCEND = ("torch", "torchvision", "triton", "pip", "setuptools", "wheel")
_CUDA_WHEEL_PREFIXES = ("nvidia-", "cuda-")


def _release(version: str) -> tuple[int, ...]:
    try:
        return Version(version).release
    except InvalidVersion:
        return ()


def ascend_trio_of(torch: str | None, torch_npu: str | None, cann: str | None) -> AscendTrio | None:
    """The known trio these installed versions are (local labels like `+cpu` and `.postN` ignored), or
    None. CANN matches by its leading release numbers (`9.1.0` matches `9.1.0.alpha001`)."""
    if not (torch and torch_npu and cann):
        return None
    for trio in ASCEND_TRIOS:
        if (
            _release(torch) == _release(trio.torch)
            and _release(torch_npu)[:3] == _release(trio.torch_npu)
            and (cann == trio.cann or cann.startswith(f"{trio.cann}."))
        ):
            return trio
    return None


def ascend_constraints(lock_text: str, trio: AscendTrio = PIP_ASCEND_TRIO) -> str:
    """The Ascend constraint set (constraints-ascend.txt, written by scripts/ascend_constraints.py): the
    lock without its CUDA torch, CUDA wheels and pip lines, plus `trio`'s torch, torchvision, torch-npu."""
    kept = []
    for line in lock_text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name = line.split("==", 1)[0].strip().lower().replace("_", "-")
        if name not in _NOT_FOR_ASCEND and not name.startswith(_CUDA_WHEEL_PREFIXES):
            kept.append(line)
    header = [
        "# The tested set (requirements-lock.txt) for Ascend hosts, with the lock's torch pair and CUDA",
        f"# wheels replaced by torch {trio.torch}, torchvision {trio.torchvision} and torch-npu "
        f"{trio.torch_npu} (CANN {trio.cann}).",
        "# Written by scripts/ascend_constraints.py; tests/runtime/test_stack.py checks it against the lock.",
        "#   pip install -c constraints-ascend.txt '.[ascend]'   (on the Ascend host, CANN sourced)",
    ]
    pins = [f"torch=={trio.torch}", f"torch-npu=={trio.torch_npu}", f"torchvision=={trio.torchvision}"]
    return "\n".join([*header, *sorted([*kept, *pins], key=str.lower)]) + "\n"
