"""Training metrics: `metrics.jsonl`, optional TensorBoard, peak memory and the loss plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch


class MetricsLog:
    """Appends one JSON record per line to `output_dir/metrics.jsonl` (appending keeps a resumed run's
    history in one file) and mirrors numbers to TensorBoard when it is installed."""

    def __init__(self, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._file = open(self.path, "a")  # noqa: SIM115 - held open for the run, closed in close()
        self._tensorboard = _tensorboard_writer(output_dir / "tensorboard")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _tensorboard_writer(log_dir: Path):
    try:
        import tensorboard  # noqa: F401 - SummaryWriter imports without it but cannot write
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


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
    losses: list[tuple[int, float]], validation_losses: list[tuple[int, float]], path: Path
) -> None:
    """Training (and validation) loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if losses:
        axes.plot(*zip(*losses, strict=True), label="training loss")
    if validation_losses:
        axes.plot(*zip(*validation_losses, strict=True), "o-", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
