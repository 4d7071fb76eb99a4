"""The profiler records whole steps after warm-up and says where their time went."""

from __future__ import annotations

import pytest
import torch

from tuner.bench.measure import StepClock, TimedLoss
from tuner.bench.profiling import OTHER, StepProfiler, kind_of


@pytest.mark.parametrize(
    ("operator", "kind"),
    [
        ("aten::mm", "matmul"),
        ("aten::addmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::convolution_backward", "convolution"),
        ("aten::_foreach_norm", "optimizer"),  # gradient clipping, not a normalisation layer
        ("Optimizer.step#AdamW.step", "optimizer"),
        ("aten::native_group_norm_backward", "normalisation"),
        ("aten::_to_copy", "copies and casts"),
        ("aten::add_", OTHER),
    ],
)
def test_operators_are_sorted_into_kinds(operator: str, kind: str):
    assert kind_of(operator) == kind


def test_profiled_steps_are_whole_steps_after_warm_up_and_written_out(tmp_path):
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Flatten()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(8 * 14 * 14, 4))
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    profiler = StepProfiler(tmp_path, "Ours: a tiny net", torch.device("cpu"), start=2, count=3)
    clock = StepClock()
    timed = TimedLoss(
        clock, lambda m, batch: m(batch).square().mean(), lambda batch: batch.shape[0], profiler=profiler
    )
    for step in range(7):
        timed(model, torch.randn(4, 3, 16, 16)).backward()
        optimizer.step()
        optimizer.zero_grad()
        # Profiling runs from the start of step 2 to the start of step 5.
        assert profiler.active == (2 <= step < 5)
    timed.finish()

    summary = profiler.summary
    assert summary is not None and profiler.end == 5
    assert sum(summary.share_by_kind.values()) == pytest.approx(1.0)
    for kind in ("matmul", "convolution", "normalisation", "optimizer"):
        assert summary.share_by_kind[kind] > 0, kind
    text = (tmp_path / "ours-a-tiny-net.profile.txt").read_text()
    assert "ms/step" in text and "aten::convolution" in text
    assert (tmp_path / "ours-a-tiny-net.trace.json.gz").stat().st_size > 0
    assert len(clock.step_seconds(profiler.end)) == 1  # the one step timed after profiling
