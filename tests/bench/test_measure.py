"""The measuring helpers report what happened: step times, FLOPs of one step, peak memory."""

from __future__ import annotations

import pytest
import torch

from tuner.bench.measure import (
    PeakMemory,
    RunFigures,
    StepClock,
    TimedLoss,
    device_peak_flops,
    model_flops_utilisation,
)


def test_step_clock_takes_the_median_after_warm_up():
    clock = StepClock(started_at=0.0)
    clock.step_starts = [10.0, 20.0, 21.0, 23.0, 24.0, 30.0]
    clock.step_samples = [2, 2, 2, 4, 2, 2]

    assert clock.time_to_first_step() == 20.0
    assert clock.step_seconds(warmup=2) == [2.0, 1.0, 6.0]
    steps_per_s, samples_per_s = clock.rates(warmup=2)
    assert steps_per_s == pytest.approx(0.5)
    assert samples_per_s == pytest.approx(1.0)  # median of 2/2, 4/1, 2/6 samples per second
    with pytest.raises(ValueError, match="warm-up"):
        clock.rates(warmup=5)


def test_timed_loss_counts_the_flops_of_one_whole_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 16, bias=False)
    clock = StepClock()
    timed = TimedLoss(clock, lambda m, batch: m(batch).square().mean(), lambda batch: batch.shape[0], 1)
    for _ in range(3):
        batch = torch.randn(8, 32)
        timed(model, batch).backward()
    timed.stop_counting()

    assert clock.step_samples == [8, 8, 8]
    # Forward (8x32 @ 32x16) and backward for the weight gradient: 2 matmuls of 2*8*32*16 FLOPs each.
    # No gradient flows to the input, so no third matmul.
    assert timed.flops == 2 * (2 * 8 * 32 * 16)


def test_peak_memory_sees_a_short_allocation_on_cpu():
    with PeakMemory(torch.device("cpu")) as baseline:
        pass
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert memory.kind == "CPU RSS"
    assert memory.peak_mb >= baseline.peak_mb + 48


def test_mfu_needs_a_known_accelerator():
    assert device_peak_flops(torch.device("cpu")) is None
    assert model_flops_utilisation(1e12, 1.0, torch.device("cpu")) is None


def test_report_names_each_ratio_against_the_reference():
    from scripts_bench import format_report

    reference = RunFigures("baseline", 1.0, 2.0, 10.0, 1000.0, "CPU RSS", extra={"tokens/s": 100.0})
    ours = RunFigures(
        "ours", 1.5, 3.0, 12.0, 900.0, "CPU RSS", extra={"padding fraction": 0.05, "tokens/s": 130.0}
    )
    report = format_report([reference, ours])
    expected = "ours / baseline: steps/s x1.50, tokens/s x1.30, time to first step x1.20, peak memory x0.90"
    assert expected in report
    assert "padding fraction 0.05" in report
    rounds = {"ours": {"steps/s": [1.4, 1.6, 1.2], "tokens/s": [1.3, 1.1, 1.2]}}
    assert "steps/s x1.40 (rounds: x1.40, x1.60, x1.20), tokens/s x1.20 (rounds:" in format_report(
        [reference, ours], rounds
    )
