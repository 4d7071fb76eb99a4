"""Where a training step's time goes: torch.profiler over a few steady-state steps, summarised.

`StepProfiler` is driven by the benchmark's timed loss function: it starts profiling at the start of
step `start` and stops at the start of step `start + count`, so whole steps (forward, backward,
optimizer, data) are recorded. Those steps are slowed by the profiler and are left out of the rates.
The summary splits the operators' self time into kinds (matrix multiplies, attention, convolutions,
normalisation, optimizer, copies, everything else) and lists the top operators; a Chrome trace
(chrome://tracing, Perfetto; gzipped, it is large) goes beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

PROFILE_STEPS = 3
TOP_OPERATORS = 20
# Operator name fragments -> kind; the first kind that matches wins, so the optimizer's foreach norms
# (gradient clipping) count as optimizer, not normalisation.
OPERATOR_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "fusion_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("convolution", ("convolution",)),
    ("optimizer", ("_foreach_", "_fused_adam", "Optimizer.")),
    ("normalisation", ("norm",)),
    ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::clone", "aten::contiguous")),
)
OTHER = "other"


@dataclass
class ProfileSummary:
    seconds_per_step: float
    share_by_kind: dict[str, float]  # kind -> fraction of the profiled self time
    table: str

    def describe(self) -> str:
        shares = ", ".join(f"{kind} {share:.0%}" for kind, share in self.share_by_kind.items())
        return f"{self.seconds_per_step * 1e3:.0f} ms/step of operator time: {shares}"


def kind_of(operator: str) -> str:
    return next(
        (kind for kind, fragments in OPERATOR_KINDS if any(fragment in operator for fragment in fragments)),
        OTHER,
    )


def summarise(prof: profile, steps: int, device: torch.device) -> ProfileSummary:
    """Self time per kind (CUDA kernel time on a GPU, host time elsewhere) and the top operators."""
    # torch.profiler sees CUDA kernels; on an NPU (torch_npu has a profiler of its own) only host time.
    time_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    by_kind: dict[str, float] = {}
    for event in averages:
        by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + getattr(event, time_key)
    total = sum(by_kind.values()) or 1.0
    shares = {kind: by_kind[kind] / total for kind in sorted(by_kind, key=by_kind.get, reverse=True)}
    table = averages.table(sort_by=time_key, row_limit=TOP_OPERATORS)
    # Profiler times are in microseconds.
    return ProfileSummary(total / 1e6 / steps, shares, table)


def profiler_for(folder: Path | None, name: str, device: torch.device, warmup: int) -> StepProfiler | None:
    """A profiler of the steps right after `warmup` when a folder is given, else None."""
    return StepProfiler(folder, name, device, start=warmup) if folder is not None else None


class StepProfiler:
    """Profile steps [start, start + count) and write `<name>.profile.txt` and `<name>.trace.json.gz`."""

    def __init__(
        self, folder: Path, name: str, device: torch.device, start: int, count: int = PROFILE_STEPS
    ) -> None:
        self.folder = folder
        self.slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
        self.device = device
        self.start = start
        self.count = count
        self.summary: ProfileSummary | None = None
        self._profile: profile | None = None

    @property
    def active(self) -> bool:
        return self._profile is not None

    @property
    def end(self) -> int:
        """The first step after the profiled ones: rates are measured from here."""
        return self.start + self.count

    def on_step(self, step: int) -> None:
        """Called at the start of every step, before it is timed."""
        if step == self.start:
            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profile = profile(activities=activities)
            self._profile.__enter__()
        elif step == self.end:
            self.finish()

    def finish(self) -> None:
        if self._profile is None:
            return
        if self.device.type != "cpu":
            getattr(torch, self.device.type).synchronize()
        self._profile.__exit__(None, None, None)
        self.summary = summarise(self._profile, self.count, self.device)
        self.folder.mkdir(parents=True, exist_ok=True)
        text = f"{self.summary.describe()}\n\n{self.summary.table}\n"
        (self.folder / f"{self.slug}.profile.txt").write_text(text, encoding="utf-8")
        self._profile.export_chrome_trace(str(self.folder / f"{self.slug}.trace.json.gz"))
        print(f"profile of {self.count} steps: {self.summary.describe()} ({self.folder / self.slug}.*)")
        self._profile = None
