"""Rounds alternate the trainers, take medians, and (isolated) run each trainer in its own process."""

from __future__ import annotations

import functools
import os

import pytest

from tuner.bench.measure import RunFigures
from tuner.bench.rounds import compare_in_rounds


def _figures(name: str, steps_per_s: float, **extra: float) -> RunFigures:
    return RunFigures(name, steps_per_s, 2 * steps_per_s, 5.0, 100.0, "CPU RSS", extra=extra)


def test_rounds_alternate_the_order_and_report_median_per_round_ratios():
    calls: list[str] = []
    # The machine slows down with every run: a fixed order would always favour the trainer run first.
    speed = iter([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])

    def trainer(name: str, factor: float) -> RunFigures:
        calls.append(name)
        speed_now = next(speed)
        return _figures(name, factor * speed_now, pid=os.getpid(), **{"tokens/s": 100 * factor * speed_now})

    compared = compare_in_rounds(
        [functools.partial(trainer, "base", 1.0), functools.partial(trainer, "ours", 1.5)],
        rounds=3,
        threads=None,
        isolate=False,
    )
    assert calls == ["base", "ours", "ours", "base", "base", "ours"]
    ratios = compared.rate_ratios["ours"]
    expected = [1.5 * 0.9 / 1.0, 1.5 * 0.8 / 0.7, 1.5 * 0.5 / 0.6]
    # Rates only: the pid is an extra figure but not one per second.
    assert set(ratios) == {"steps/s", "tokens/s"}
    assert ratios["steps/s"] == pytest.approx(expected) and ratios["tokens/s"] == pytest.approx(expected)
    assert compared.median_ratio("ours") == compared.median_ratio("ours", "tokens/s") == pytest.approx(1.35)
    base, ours = compared.figures
    assert base.steps_per_s == pytest.approx(0.7) and ours.steps_per_s == pytest.approx(1.5 * 0.8)
    assert ours.samples_per_s == pytest.approx(2 * 1.5 * 0.8)


def _report_pid() -> RunFigures:
    return _figures("child", 1.0, pid=os.getpid())


def test_isolated_runs_each_get_a_fresh_process():
    compared = compare_in_rounds([_report_pid], rounds=2, threads=1)
    pids = [round_figures[0].extra["pid"] for round_figures in compared.rounds]
    assert os.getpid() not in pids and pids[0] != pids[1]
