"""Benchmark tuner's trainers: `python scripts/bench.py sdxl|qwenvl [--scale small|full] ...`.

Runs our trainer and its reference (SDXL: the diffusers example's algorithm; Qwen-VL: plain random
batching) in one invocation, on the same model, data, batch, resolution, seed and thread count, and
prints both with their ratio. Each run gets a fresh process and `--rounds N` alternates them N times
(see tuner/bench/rounds.py for why). See docs/benchmarks.md for the figures and how they were taken.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from tuner.bench.measure import RunFigures, environment_description
from tuner.bench.profiling import PROFILE_STEPS
from tuner.bench.rounds import compare_in_rounds, per_round_rate_ratios
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
    parser.add_argument("--compile", action="store_true", help="SDXL: also our trainer with runtime.compile")
    parser.add_argument(
        "--channels-last", action="store_true", help="SDXL: also our trainer with runtime.channels_last"
    )
    parser.add_argument("--dora", action="store_true", help="SDXL: also our trainer with lora.variant dora")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the trainers this many times")
    parser.add_argument(
        "--same-process", action="store_true", help="run every trainer in this process (debugging)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="run our trainer only")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="Qwen-VL: also with it on")
    parser.add_argument("--packing", action="store_true", help="Qwen-VL: also packed batches, random order")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"profile {PROFILE_STEPS} steps of our trainer(s) after warm-up into DIR (not in the rates)",
    )
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "tuner-bench")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.model == "sdxl":
        from tuner.bench.sdxl_bench import SDXLBenchSettings, sdxl_trainers

        settings = SDXLBenchSettings(
            scale=args.scale,
            device=device,
            steps=args.steps,
            batch_size=args.batch_size,
            resolution=args.resolution or DEFAULT_RESOLUTION[args.scale],
            images=args.samples or 16,
            profile_dir=args.profile,
        )
        switches = (("channels_last", args.channels_last), ("compile", args.compile), ("dora", args.dora))
        variants = tuple(name for name, on in switches if on)
        trainers = sdxl_trainers(settings, args.work_dir, baseline=not args.no_baseline, variants=variants)
    else:
        from tuner.bench.qwenvl_bench import QwenVLBenchSettings, qwenvl_trainers

        settings = QwenVLBenchSettings(
            scale=args.scale,
            device=device,
            steps=args.steps,
            batch_size=args.batch_size,
            conversations=args.samples or 64,
            gradient_checkpointing=args.gradient_checkpointing,
            packing=args.packing,
            profile_dir=args.profile,
        )
        trainers = qwenvl_trainers(settings, args.work_dir)
    compared = compare_in_rounds(trainers, args.rounds, args.threads, isolate=not args.same_process)
    figures = compared.figures
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": dict(settings.__dict__),
        "environment": environment_description(torch.device(device)),
        "runs": [figure.as_dict() for figure in figures],
        "rounds": [[figure.as_dict() for figure in round_figures] for round_figures in compared.rounds],
        "rate_ratios": compared.rate_ratios,
    }
    print(format_report(figures, compared.rate_ratios))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


def format_report(
    figures: list[RunFigures], rate_ratios: dict[str, dict[str, list[float]]] | None = None
) -> str:
    """One line per trainer (medians over rounds), then each later trainer's ratios to the first (the
    reference): every rate (steps/s, tokens/s, ...) as the median of its per-round ratios when there
    were rounds, then time to first step and peak memory."""
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
    # Without rounds, the ratios of these figures alone (one round).
    rate_ratios = rate_ratios or per_round_rate_ratios([figures])
    for figure in figures[1:]:
        per_rate = rate_ratios[figure.name]
        parts = []
        for rate, per_round in per_rate.items():
            listed = ", ".join(f"x{ratio:.2f}" for ratio in per_round)
            rounds_note = f" (rounds: {listed})" if len(per_round) > 1 else ""
            parts.append(f"{rate} x{statistics.median(per_round):.2f}{rounds_note}")
        first_step_ratio = figure.time_to_first_step_s / reference.time_to_first_step_s
        parts.append(f"time to first step x{first_step_ratio:.2f}")
        parts.append(f"peak memory x{figure.peak_memory_mb / reference.peak_memory_mb:.2f}")
        lines.append(f"{figure.name} / {reference.name}: " + ", ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
