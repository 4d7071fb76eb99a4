from __future__ import annotations

import importlib.util

import pytest
import torch

from tuner.errors import ConfigError
from tuner.training.optim import build_lr_scheduler, build_optimizer


def _params():
    return [torch.nn.Parameter(torch.ones(3))]


def _lr_after(scheduler, steps):
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0]


@pytest.mark.parametrize(("name", "final_lr"), [("constant", 1e-3), ("cosine", 0.0), ("linear", 0.0)])
def test_schedule_warms_up_linearly_then_ends_where_it_should(name, final_lr):
    optimizer = build_optimizer("sgd", _params(), lr=1e-3)
    scheduler = build_lr_scheduler(optimizer, name, warmup_steps=4, total_steps=10)
    assert scheduler.get_last_lr()[0] == 0.0
    assert _lr_after(scheduler, 2) == pytest.approx(0.5e-3)
    assert _lr_after(scheduler, 2) == pytest.approx(1e-3)  # end of warmup
    assert _lr_after(scheduler, 6) == pytest.approx(final_lr, abs=1e-12)


def test_cosine_is_halfway_down_halfway_through_the_decay():
    scheduler = build_lr_scheduler(build_optimizer("sgd", _params(), lr=1.0), "cosine", 2, 12)
    assert _lr_after(scheduler, 7) == pytest.approx(0.5)


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ConfigError, match=r"optim\.name") as error:
        build_optimizer("adamww", _params(), lr=1e-3)
    assert "'adamw'" in error.value.hint
    with pytest.raises(ConfigError, match=r"optim\.scheduler") as error:
        build_lr_scheduler(build_optimizer("sgd", _params(), lr=1.0), "cosin", 0, 10)
    assert "'cosine'" in error.value.hint


def test_import_paths_build_optimizers_and_bad_ones_are_config_errors():
    optimizer = build_optimizer("torch.optim.RAdam", _params(), lr=1e-3, betas=(0.8, 0.9))
    assert isinstance(optimizer, torch.optim.RAdam)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(ConfigError, match="cannot import"):
        build_optimizer("torch.optim.NoSuchOptimizer", _params(), lr=1e-3)
    with pytest.raises(ConfigError, match="not a torch"):
        build_optimizer("collections.OrderedDict", _params(), lr=1e-3)


def test_builtin_optimizers_take_our_settings():
    adamw = build_optimizer("adamw", _params(), lr=2e-4, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-7)
    group = adamw.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (
        2e-4,
        0.1,
        (0.8, 0.95),
        1e-7,
    )
    assert group["foreach"] and not group["fused"]  # fused only on cuda/npu
    adafactor = build_optimizer("adafactor", _params(), lr=3e-4)
    assert adafactor.param_groups[0]["lr"] == 3e-4 and not adafactor.param_groups[0]["relative_step"]
    params = _params()
    params[0].grad = torch.ones(3)
    adafactor = build_optimizer("adafactor", params, lr=0.1)
    adafactor.step()
    assert not torch.equal(params[0].detach(), torch.ones(3))


def test_adamw8bit_needs_cuda():
    with pytest.raises(ConfigError, match="CUDA") as error:
        build_optimizer("adamw8bit", _params(), lr=1e-3, device_type="cpu")
    assert "adamw" in error.value.hint


@pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is not None, reason="prodigyopt is installed")
def test_missing_optional_optimizer_says_what_to_install():
    with pytest.raises(ConfigError, match="prodigyopt") as error:
        build_optimizer("prodigy", _params(), lr=1.0)
    assert "pip install prodigyopt" in error.value.hint


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_schedules_follow_transformers_curves_and_stay_at_zero_after_the_end(name):
    from transformers import optimization

    def scheduler(build):
        return build(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))

    ours = scheduler(lambda optimizer: build_lr_scheduler(optimizer, name, 3, 12))
    reference_build = {
        "constant": lambda o: optimization.get_constant_schedule_with_warmup(o, 3),
        "cosine": lambda o: optimization.get_cosine_schedule_with_warmup(o, 3, 12),
        "linear": lambda o: optimization.get_linear_schedule_with_warmup(o, 3, 12),
    }[name]
    reference = scheduler(reference_build)
    for _ in range(12):
        assert ours.get_last_lr()[0] == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        ours.step()
        reference.step()
    for _ in range(5):
        ours.step()
        assert ours.get_last_lr()[0] == (1.0 if name == "constant" else 0.0)


def _npu_listed_as_fused(monkeypatch) -> None:
    # What importing torch_npu does: its backend name joins torch's fused-capable devices.
    from torch.utils import _foreach_utils

    listed = _foreach_utils._get_fused_kernels_supported_devices()
    monkeypatch.setattr(_foreach_utils, "_get_fused_kernels_supported_devices", lambda: [*listed, "npu"])


def test_adamw_on_npu_is_fused_only_after_the_probe_step_worked(monkeypatch, caplog):
    from tuner.runtime import npu

    _npu_listed_as_fused(monkeypatch)
    probed = []
    monkeypatch.setattr(npu, "fused_adamw_failure", lambda device: probed.append(device))
    group = build_optimizer("adamw", _params(), lr=1e-3, device_type="npu").param_groups[0]
    assert group["fused"] and not group["foreach"] and probed == ["npu"]

    failure = "RuntimeError: aclnnApplyAdamWV2 is not supported on this device"
    monkeypatch.setattr(npu, "fused_adamw_failure", lambda device: failure)
    with caplog.at_level("WARNING", logger="tuner.training.optim"):
        group = build_optimizer("adamw", _params(), lr=1e-3, device_type="npu").param_groups[0]
    assert group["foreach"] and not group["fused"]
    assert failure in caplog.text and "foreach" in caplog.text


def test_adamw_on_cuda_and_cpu_never_runs_the_npu_probe(monkeypatch):
    from tuner.runtime import npu

    _npu_listed_as_fused(monkeypatch)
    monkeypatch.setattr(npu, "fused_adamw_failure", lambda device: pytest.fail("probed off the NPU"))
    assert build_optimizer("adamw", _params(), lr=1e-3, device_type="cuda").param_groups[0]["fused"]
    assert build_optimizer("adamw", _params(), lr=1e-3, device_type="cpu").param_groups[0]["foreach"]
