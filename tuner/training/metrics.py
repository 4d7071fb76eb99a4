"""Training metrics: `metrics.jsonl`, experiment trackers, the run report, peak memory and the loss plot."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# What the loop logs into the output folder. The writers, the run report and RUN_OUTPUTS
# (tuner.training.outputs, what --overwrite removes) all take the names from here.
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
SAMPLES_DIR = "samples"  # sample grids (SDXL) or sample answers (Qwen-VL) during training


class MetricsLog:
    """Appends one JSON record per line to `output_dir/metrics.jsonl` (appending keeps a resumed run's
    history in one file) and sends every number to the run's experiment trackers (Accelerate's
    `GeneralTracker`s, started by the recipe with `accelerator.init_trackers`; see tuner.training.trackers).
    Every scalar the loop logs passes through here."""

    def __init__(self, output_dir: Path, trackers: Sequence[Any] = ()) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.output_dir = output_dir
        self.path = output_dir / METRICS_FILE
        self._file = open(self.path, "a")  # noqa: SIM115 - held open for the run, closed in close()
        self._trackers = list(trackers)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {
            key: value
            for key, value in record.items()
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
        }
        for tracker in self._trackers:
            tracker.log(numbers, step=record["step"])

    def refresh_report(self) -> None:
        """Rewrite `report.html` from what the run has written so far (called at every checkpoint)."""
        from tuner.report.html import this_environment, write_run_report

        write_run_report(self.output_dir, this_environment())

    def close(self) -> None:
        self._file.close()


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by tensors on `device`; on CPU the process's peak RSS."""
    if device.type != "cpu":
        return torch.accelerator.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS and in kilobytes on Linux.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def plot_losses(
    losses: list[tuple[int, float]],
    validation_losses: list[tuple[int, float]],
    path: Path,
    part_losses: dict[str, list[tuple[int, float]]] | None = None,
) -> None:
    """Training (and validation) loss against optimizer step, as a PNG; `part_losses` (e.g. SDXL's
    instance and prior losses) are drawn beside the total, dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if losses:
        # With parts, the total is what trains: the parts weighted (e.g. by the prior loss weight).
        axes.plot(
            *zip(*losses, strict=True), label="training loss (weighted)" if part_losses else "training loss"
        )
    for name, pairs in (part_losses or {}).items():
        axes.plot(*zip(*pairs, strict=True), "--", label=f"{name} loss")
    if validation_losses:
        axes.plot(*zip(*validation_losses, strict=True), "o-", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
