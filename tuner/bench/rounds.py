"""Trainers compared in rounds, each run in a fresh process, so neither inherits the other's state.

A trainer run second in one process starts on the first one's heap (glibc keeps freed arenas, and
`malloc_trim` gives back only part of them) and warm caches, and a shared machine's speed drifts by
tens of percent over minutes. So every run gets its own spawned process (same thread count and
environment), the rounds alternate the order (ABBA...) so drift does not always favour the same
trainer, and a ratio is the median of the per-round ratios, each taken between runs minutes apart.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

from tuner.bench.measure import RunFigures

Trainer = Callable[[], RunFigures]  # picklable: a module-level function or a functools.partial of one


STEPS_PER_S = "steps/s"


@dataclass
class ComparedRuns:
    """Each trainer's figures (medians over rounds) and, for every trainer after the first (the
    reference), the per-round ratios of each of its rates to the reference's: steps/s, and every extra
    figure counted per second (tokens/s for Qwen-VL, whose steps differ in size)."""

    figures: list[RunFigures]
    rounds: list[list[RunFigures]]
    rate_ratios: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def median_ratio(self, name: str, rate: str = STEPS_PER_S) -> float:
        return statistics.median(self.rate_ratios[name][rate])


def rates_of(figures: RunFigures) -> dict[str, float]:
    """steps/s and the extra figures whose name ends in "/s"."""
    extra_rates = {key: value for key, value in figures.extra.items() if key.endswith("/s")}
    return {STEPS_PER_S: figures.steps_per_s, **extra_rates}


def compare_in_rounds(
    trainers: list[Trainer], rounds: int, threads: int | None, isolate: bool = True
) -> ComparedRuns:
    """Run every trainer `rounds` times, alternating the order, each in a fresh process if `isolate`."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    runs: list[list[RunFigures]] = []
    for number in range(rounds):
        order = list(range(len(trainers)))
        if number % 2 == 1:
            order.reverse()
        results: dict[int, RunFigures] = {}
        for index in order:
            results[index] = _run_fresh(trainers[index], threads) if isolate else trainers[index]()
        runs.append([results[index] for index in range(len(trainers))])
    figures = [_median_figures([run[index] for run in runs]) for index in range(len(trainers))]
    return ComparedRuns(figures, runs, per_round_rate_ratios(runs))


def per_round_rate_ratios(runs: list[list[RunFigures]]) -> dict[str, dict[str, list[float]]]:
    """Trainer name -> rate -> its per-round ratios to the first trainer's (the reference's) rate, for
    every trainer after the first; `runs` holds one list of figures per round, trainers in order."""
    ratios: dict[str, dict[str, list[float]]] = {}
    for index, figures in enumerate(runs[0][1:], start=1):
        shared = [rate for rate in rates_of(figures) if rate in rates_of(runs[0][0])]
        ratios[figures.name] = {
            rate: [rates_of(run[index])[rate] / rates_of(run[0])[rate] for run in runs] for rate in shared
        }
    return ratios


def _run_fresh(trainer: Trainer, threads: int | None) -> RunFigures:
    # spawn, not fork: a forked child would start with this process's heap and torch state.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_run_with_threads, trainer, threads).result()


def _run_with_threads(trainer: Trainer, threads: int | None) -> RunFigures:
    import torch

    from tuner.bench import measure

    _die_with_parent()
    measure.CLOCK_FROM_PROCESS_START = True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)
    return trainer()


def _die_with_parent() -> None:
    """Linux: end this run if the benchmark that started it is killed (a timeout, Ctrl-C), instead of
    compiling or training on as an orphan. Elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _median_figures(runs: list[RunFigures]) -> RunFigures:
    """One trainer's rounds as one set of figures: the median of each."""
    first = runs[0]

    def median(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return statistics.median(known) if known else None

    return replace(
        first,
        steps_per_s=statistics.median(run.steps_per_s for run in runs),
        samples_per_s=statistics.median(run.samples_per_s for run in runs),
        time_to_first_step_s=statistics.median(run.time_to_first_step_s for run in runs),
        peak_memory_mb=statistics.median(run.peak_memory_mb for run in runs),
        flops_per_step=median([run.flops_per_step for run in runs]),
        mfu=median([run.mfu for run in runs]),
        extra={key: statistics.median(run.extra[key] for run in runs) for key in first.extra},
    )
