"""The scaling plot of docs/benchmarks.md: `python -m tuner.bench.plot OUT.png RUN.json...`.

Each RUN.json is a `scripts/bench.py --json` report of our SDXL trainer; runs at the main resolution
make the batch-size panels and runs at the main batch size make the resolution panels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_scaling(reports: list[dict], output: Path, batch_size: int = 2, resolution: int = 128) -> None:
    """Samples/s and peak memory of our trainer against batch size and against resolution."""
    ours = [(report["settings"], report["runs"][-1]) for report in reports]
    by_batch = sorted((s["batch_size"], run) for s, run in ours if s["resolution"] == resolution)
    by_resolution = sorted((s["resolution"], run) for s, run in ours if s["batch_size"] == batch_size)
    figure, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    panels = (
        (by_batch, "batch size", f"at {resolution} px"),
        (by_resolution, "resolution (px)", f"at batch {batch_size}"),
    )
    for column, (points, label, fixed) in enumerate(panels):
        xs = [x for x, _ in points]
        axes[0][column].plot(xs, [run["samples_per_s"] for _, run in points], marker="o")
        axes[0][column].set_ylabel("samples/s (median step)")
        axes[1][column].plot(xs, [run["peak_memory_mb"] for _, run in points], marker="o", color="tab:red")
        axes[1][column].set_ylabel("peak CPU RSS (MiB)")
        for row in (0, 1):
            axes[row][column].set_xlabel(label)
            axes[row][column].set_xticks(xs)
            axes[row][column].set_title(f"SDXL small, ours, {fixed}", fontsize=10)
            axes[row][column].grid(alpha=0.3)
    figure.suptitle("tuner SDXL LoRA step, 1/5-width SDXL, 2 shared CPU threads (2026-11-23)")
    figure.tight_layout()
    figure.savefig(output, dpi=110)


if __name__ == "__main__":
    plot_scaling([json.loads(Path(p).read_text()) for p in sys.argv[2:]], Path(sys.argv[1]))
