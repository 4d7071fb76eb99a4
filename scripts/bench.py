"""Benchmark tuner's trainers: `python scripts/bench.py sdxl|qwenvl [--scale small|full] ...`.

Runs our trainer and its reference (SDXL: the diffusers example's algorithm; Qwen-VL: plain random
batching) in one process, on the same model, data, batch, resolution, seed and thread count, and
prints both with their ratio. See docs/benchmarks.md for the figures and how they were taken.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from tuner.bench.measure import RunFigures, environment_description
from tuner.bench.sdxl_shapes import DEFAULT_RESOLUTION


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("sdxl", "qwenvl"))
    parser.add_argument("--scale", choices=("small", "full"), default="small")
    parser.add_argument("--device", default=None, help="cpu, cuda, npu (default: cuda if present, else cpu)")
    parser.add_argument("--steps", type=int, default=8, help="steps per trainer, 2 of them warm-up")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--resolution", type=int, default=None, help="SDXL pixels (default 128 small, 1024 full)"
    )
    parser.add_argument("--samples", type=int, default=None, help="images / conversations in the data set")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--compile", action="store_true", help="SDXL: our trainer with runtime.compile")
    parser.add_argument("--channels-last", action="store_true", help="SDXL: our UNet in channels-last")
    parser.add_argument("--no-baseline", action="store_true", help="run our trainer only")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="Qwen-VL: also with it on")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "tuner-bench")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.model == "sdxl":
        from tuner.bench.sdxl_bench import SDXLBenchSettings, run_sdxl_bench

        settings = SDXLBenchSettings(
            scale=args.scale,
            device=device,
            steps=args.steps,
            batch_size=args.batch_size,
            resolution=args.resolution or DEFAULT_RESOLUTION[args.scale],
            images=args.samples or 16,
            compile=args.compile,
            channels_last=args.channels_last,
        )
        figures = run_sdxl_bench(settings, args.work_dir, baseline=not args.no_baseline)
    else:
        from tuner.bench.qwenvl_bench import QwenVLBenchSettings, run_qwenvl_bench

        settings = QwenVLBenchSettings(
            scale=args.scale,
            device=device,
            steps=args.steps,
            batch_size=args.batch_size,
            conversations=args.samples or 64,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        figures = run_qwenvl_bench(settings, args.work_dir)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": dict(settings.__dict__),
        "environment": environment_description(torch.device(device)),
        "runs": [figure.as_dict() for figure in figures],
    }
    print(format_report(figures))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


def format_report(figures: list[RunFigures]) -> str:
    """One line per trainer, then each later trainer's ratio to the first (the reference)."""
    lines = []
    for figure in figures:
        line = (
            f"{figure.name}: {figure.steps_per_s:.3f} steps/s, {figure.samples_per_s:.2f} samples/s, "
            f"first step after {figure.time_to_first_step_s:.1f} s, peak {figure.memory_kind} "
            f"{figure.peak_memory_mb:.0f} MiB"
        )
        if figure.flops_per_step:
            line += f", {figure.flops_per_step / 1e12:.3f} TFLOP/step"
        if figure.mfu is not None:
            line += f", MFU {figure.mfu:.1%}"
        line += "".join(f", {key} {value:.4g}" for key, value in figure.extra.items())
        lines.append(line)
    reference = figures[0]
    for figure in figures[1:]:
        lines.append(
            f"{figure.name} / {reference.name}: steps/s x{figure.steps_per_s / reference.steps_per_s:.2f}, "
            f"time to first step x{figure.time_to_first_step_s / reference.time_to_first_step_s:.2f}, "
            f"peak memory x{figure.peak_memory_mb / reference.peak_memory_mb:.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
