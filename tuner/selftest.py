"""`tuner selftest`: does this machine train, merge and infer? The whole pipeline on the tiny models.

For each device asked for, and each model family (SDXL, Qwen-VL): build the tiny model, train a LoRA for
a few steps on the tiny dataset, merge it into the base, and infer with the adapter. Each check is
timed; a check that raises is a `fail` (with the error), one whose input failed is `skipped`, and one
whose code is not installed in this build (`ImportError`) is `not available`. Nothing is downloaded.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuner.runtime import npu
from tuner.runtime.device import probe_cuda

Status = Literal["pass", "fail", "skipped", "not available"]
# Enough to take optimizer steps and write a checkpoint-free adapter; more only costs time.
TRAIN_STEPS = 2
# The sizes of the tiny datasets' images are ~100 px: these keep every step to a few hundred tokens.
QWENVL_MAX_PIXELS = 64 * 64
QWENVL_MIN_PIXELS = 56 * 56
SDXL_RESOLUTION = 64


@dataclass(frozen=True)
class CheckResult:
    device: str
    family: str  # sdxl | qwenvl
    check: str  # build | train | merge | infer
    status: Status
    seconds: float
    detail: str = ""


def selftest_devices(device: str | None, all_devices: bool) -> list[str]:
    """The devices to test: every one this machine has (CPU always) with `all_devices`, else `device`
    (default: the one a run would pick, NPU, then CUDA, then CPU)."""
    present = ["cpu"]
    if probe_cuda().device_count:
        present.insert(0, "cuda")
    if npu.probe_npu().available:
        present.insert(0, "npu")
    if all_devices:
        return present
    return [device] if device and device != "auto" else present[:1]


def run_selftest(devices: list[str], work_dir: Path | None = None) -> list[CheckResult]:
    """Every check on every device, in order; never raises for a failing check."""
    results: list[CheckResult] = []
    with tempfile.TemporaryDirectory(prefix="tuner-selftest-") as scratch:
        root = Path(work_dir) if work_dir is not None else Path(scratch)
        for device in devices:
            for family, checks in (("sdxl", _sdxl_checks), ("qwenvl", _qwenvl_checks)):
                results.extend(_run_family(device, family, checks(device, root / device / family)))
    return results


def format_results(results: list[CheckResult]) -> str:
    """A table, one row per check (the first line of any error last), and a summary line."""
    header = ("device", "model", "check", "result", "seconds")
    rows = [header] + [(r.device, r.family, r.check, r.status, f"{r.seconds:.1f}") for r in results]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    details = [""] + [r.detail.splitlines()[0] if r.detail else "" for r in results]
    lines = [
        (
            "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)) + "  " + detail
        ).rstrip()
        for row, detail in zip(rows, details, strict=True)
    ]
    failed = sum(r.status == "fail" for r in results)
    missing = sum(r.status == "not available" for r in results)
    passed = sum(r.status == "pass" for r in results)
    summary = f"{passed} of {len(results)} checks passed"
    summary += f", {failed} failed" if failed else ""
    summary += f", {missing} not available in this build" if missing else ""
    return "\n".join([*lines, summary])


def _run_family(device: str, family: str, checks: list[tuple[str, Callable[[], None]]]) -> list[CheckResult]:
    results = []
    broken = False  # each check needs the one before it (the model, then the adapter)
    for name, check in checks:
        if broken:
            results.append(CheckResult(device, family, name, "skipped", 0.0, "an earlier check failed"))
            continue
        start = time.perf_counter()
        try:
            _reset_accelerate()
            check()
        except ImportError as error:
            results.append(
                CheckResult(device, family, name, "not available", time.perf_counter() - start, str(error))
            )
            broken = name in ("build", "train")
            continue
        except Exception as error:  # a failing check is a result, not a crash
            detail = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
            results.append(CheckResult(device, family, name, "fail", time.perf_counter() - start, detail))
            broken = True
            continue
        results.append(CheckResult(device, family, name, "pass", time.perf_counter() - start))
    return results


def _reset_accelerate() -> None:
    # Accelerate 1.15 keeps one process-wide state, created by the first Accelerator; a check on
    # another device (or the next training run) needs a fresh one, as a new process would have.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _sdxl_checks(device: str, folder: Path) -> list[tuple[str, Callable[[], None]]]:
    adapter_dir, merged, image = folder / "train", folder / "merged", folder / "infer.png"

    def build() -> None:
        from tuner.tiny import build_tiny

        build_tiny("sdxl")

    def train() -> None:
        from tuner.config.schema import RunConfig
        from tuner.recipes.sdxl import train_sdxl_lora

        config = RunConfig.model_validate(
            {
                "task": "sdxl-lora",
                "model": {"name_or_path": "tiny"},
                "data": {"path": "tiny", "resolution": SDXL_RESOLUTION, "bucket_step": 32},
                "lora": {"rank": 4},
                "train": {"batch_size": 2, "max_steps": TRAIN_STEPS, "cache_dir": str(folder / "cache")},
                "output": {"dir": str(adapter_dir), "log_every": 1, "sample_steps": 1},
                "runtime": {"device": device},
            }
        )
        train_sdxl_lora(config)

    def merge() -> None:
        from tuner.models.sdxl_merge import merge_sdxl_adapter

        merge_sdxl_adapter("tiny", adapter_dir, merged, warn=lambda message: None)

    def infer() -> None:
        from tuner.models.sdxl_infer import Adapter, GenerationSettings, infer_sdxl

        settings = GenerationSettings(
            prompt="a red square",
            steps=2,
            size=(SDXL_RESOLUTION, SDXL_RESOLUTION),
            model="tiny",
            adapters=[Adapter(adapter_dir)],
        )
        infer_sdxl(settings, image, device=device)
        if not image.is_file():
            raise RuntimeError(f"inference wrote no image at {image}")

    return [("build", build), ("train", train), ("merge", merge), ("infer", infer)]


def _qwenvl_checks(device: str, folder: Path) -> list[tuple[str, Callable[[], None]]]:
    adapter_dir, merged = folder / "train", folder / "merged"

    def build() -> None:
        from tuner.tiny import build_tiny

        build_tiny("qwen2.5-vl")

    def train() -> None:
        from tuner.config.schema import RunConfig
        from tuner.recipes.qwenvl import train_qwenvl_lora

        config = RunConfig.model_validate(
            {
                "task": "qwenvl-lora",
                "model": {"name_or_path": "tiny"},
                "data": {"path": "tiny", "max_pixels": QWENVL_MAX_PIXELS, "min_pixels": QWENVL_MIN_PIXELS},
                "lora": {"rank": 4, "targets": ["llm", "vision"]},
                "train": {"batch_size": 2, "max_steps": TRAIN_STEPS},
                "output": {"dir": str(adapter_dir), "log_every": 1},
                "runtime": {"device": device},
            }
        )
        train_qwenvl_lora(config)

    def merge() -> None:
        from tuner.models.qwenvl_merge import merge_qwenvl_adapter

        merge_qwenvl_adapter("tiny", adapter_dir, merged)

    def infer() -> None:
        from tuner.models.qwenvl_infer import answer_prompt, load_answerer
        from tuner.runtime import resolve_runtime

        answerer = load_answerer("tiny", resolve_runtime(device), adapter_dir)
        answer = answer_prompt(answerer, "Name a colour.", [], max_new_tokens=4)
        if not isinstance(answer, str):
            raise RuntimeError(f"inference returned {type(answer).__name__}, not text")

    return [("build", build), ("train", train), ("merge", merge), ("infer", infer)]
