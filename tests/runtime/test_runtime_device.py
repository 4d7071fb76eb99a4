"""Device and precision policy with the NPU and CUDA probes replaced (no accelerator on CI)."""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

from tuner.errors import ConfigError, DeviceError
from tuner.runtime import (
    Runtime,
    apply_npu_defaults,
    build_accelerator,
    configure_unet_attention,
    device,
    npu,
    resolve_runtime,
)
from tuner.runtime.device import CudaProbe
from tuner.runtime.npu import NPU_ENV_DEFAULTS, NpuProbe

NO_NPU = NpuProbe(installed=False)
NPU_910B = NpuProbe(installed=True, torch_npu_version="2.14.0", device_count=8, bf16_supported=True)
NPU_910A = NpuProbe(installed=True, torch_npu_version="2.14.0", device_count=8, bf16_supported=False)
NPU_BROKEN = NpuProbe(installed=True, import_error="OSError: libhccl.so: cannot open shared object file")
NO_CUDA = CudaProbe()
AMPERE = CudaProbe(device_count=2, bf16_supported=True)
TURING = CudaProbe(device_count=1, bf16_supported=False)


@pytest.fixture(autouse=True)
def clean_device_env(monkeypatch):
    """resolve_runtime writes os.environ; monkeypatch restores whatever these were."""
    for name in ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", *NPU_ENV_DEFAULTS):
        monkeypatch.delenv(name, raising=False)

    def no_torch_npu():
        raise ImportError("torch_npu is never installed in tests")

    monkeypatch.setattr(npu, "import_torch_npu", no_torch_npu)


def use_probes(monkeypatch, npu_probe: NpuProbe, cuda_probe: CudaProbe) -> None:
    monkeypatch.setattr(npu, "probe_npu", lambda: npu_probe)
    monkeypatch.setattr(device, "probe_cuda", lambda: cuda_probe)


@pytest.mark.parametrize(
    ("npu_probe", "cuda_probe", "expected"),
    [
        (NPU_910B, AMPERE, "npu"),
        (NPU_BROKEN, AMPERE, "cuda"),
        (NO_NPU, AMPERE, "cuda"),
        (NpuProbe(installed=True, torch_npu_version="2.14.0"), NO_CUDA, "cpu"),
        (NO_NPU, NO_CUDA, "cpu"),
    ],
)
def test_auto_prefers_npu_then_cuda_then_cpu(monkeypatch, npu_probe, cuda_probe, expected):
    use_probes(monkeypatch, npu_probe, cuda_probe)
    assert resolve_runtime("auto").device_type == expected


@pytest.mark.parametrize(
    ("requested", "npu_probe", "cuda_probe", "precision", "dtype"),
    [
        ("npu", NPU_910B, NO_CUDA, "bf16", torch.bfloat16),
        ("npu", NPU_910A, NO_CUDA, "fp16", torch.float16),
        ("cuda", NO_NPU, AMPERE, "bf16", torch.bfloat16),
        ("cuda", NO_NPU, TURING, "fp16", torch.float16),
        ("cpu", NPU_910B, AMPERE, "no", torch.float32),
    ],
)
def test_auto_precision_follows_device(monkeypatch, requested, npu_probe, cuda_probe, precision, dtype):
    use_probes(monkeypatch, npu_probe, cuda_probe)
    runtime = resolve_runtime(requested, "auto")
    assert (runtime.device_type, runtime.mixed_precision, runtime.compute_dtype) == (
        requested,
        precision,
        dtype,
    )


def test_explicit_precision_is_kept_where_possible(monkeypatch):
    use_probes(monkeypatch, NPU_910B, AMPERE)
    assert resolve_runtime("npu", "fp16").mixed_precision == "fp16"
    assert resolve_runtime("cuda", "no").mixed_precision == "no"
    assert resolve_runtime("cpu", "bf16").mixed_precision == "bf16"
    assert resolve_runtime("cuda").device_count == 2


@pytest.mark.parametrize(
    ("requested", "precision", "npu_probe", "cuda_probe", "message", "hint"),
    [
        ("npu", "bf16", NPU_910A, NO_CUDA, "bf16", "fp16"),
        ("cuda", "bf16", NO_NPU, TURING, "bf16", "fp16"),
        ("cuda", "auto", NPU_910B, NO_CUDA, "CUDA", "nvidia-smi"),
        ("npu", "auto", NO_NPU, AMPERE, "not installed", "tuner[ascend]"),
        ("npu", "auto", NPU_BROKEN, AMPERE, "libhccl.so", "set_env.sh"),
        (
            "npu",
            "auto",
            NpuProbe(installed=True, torch_npu_version="2.14.0"),
            NO_CUDA,
            "no device",
            "npu-smi",
        ),
        ("cpu", "fp16", NO_NPU, NO_CUDA, "fp16", "--mixed-precision no"),
    ],
)
def test_impossible_choices_raise_device_error(
    monkeypatch, requested, precision, npu_probe, cuda_probe, message, hint
):
    use_probes(monkeypatch, npu_probe, cuda_probe)
    with pytest.raises(DeviceError) as raised:
        resolve_runtime(requested, precision)
    assert message in raised.value.message
    assert hint in raised.value.hint


@pytest.mark.parametrize(("requested", "precision"), [("gpu", "auto"), ("cpu", "fp8")])
def test_unknown_values_are_config_errors(monkeypatch, requested, precision):
    use_probes(monkeypatch, NO_NPU, NO_CUDA)
    with pytest.raises(ConfigError):
        resolve_runtime(requested, precision)


@pytest.mark.parametrize(
    ("requested", "npu_probe", "cuda_probe", "variable", "other"),
    [
        ("npu", NPU_910B, NO_CUDA, "ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"),
        ("cuda", NO_NPU, AMPERE, "CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES"),
        ("auto", NO_NPU, AMPERE, "CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES"),
        ("auto", NPU_910B, AMPERE, "ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"),
    ],
)
def test_devices_map_to_the_chosen_devices_variable(
    monkeypatch, requested, npu_probe, cuda_probe, variable, other
):
    seen_while_probing = {}

    def probing_cuda():
        # CUDA initializes while probing bf16 support, so the restriction must already be in place.
        seen_while_probing[variable] = os.environ.get(variable)
        return cuda_probe

    monkeypatch.setattr(npu, "probe_npu", lambda: npu_probe)
    monkeypatch.setattr(device, "probe_cuda", probing_cuda)
    monkeypatch.setenv(other, "7")
    resolve_runtime(requested, devices="0, 1")
    assert os.environ[variable] == "0,1"
    assert seen_while_probing[variable] == "0,1"
    assert os.environ[other] == "7"  # the other accelerator's variable is left as the user had it


@pytest.mark.parametrize("devices", ["0;1", "a", "0,0", "", "-1"])
def test_malformed_devices_are_rejected(monkeypatch, devices):
    use_probes(monkeypatch, NO_NPU, AMPERE)
    with pytest.raises(ConfigError, match="devices"):
        resolve_runtime("cuda", devices=devices)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_devices_on_cpu_is_an_error_and_sets_nothing(monkeypatch):
    use_probes(monkeypatch, NO_NPU, NO_CUDA)
    with pytest.raises(DeviceError, match="CPU"):
        resolve_runtime("auto", devices="0")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert "ASCEND_RT_VISIBLE_DEVICES" not in os.environ


def test_npu_defaults_keep_user_values_and_report_what_they_set():
    env = {"HCCL_CONNECT_TIMEOUT": "300", "TASK_QUEUE_ENABLE": "0"}
    applied = apply_npu_defaults(env)
    assert env["HCCL_CONNECT_TIMEOUT"] == "300"
    assert env["TASK_QUEUE_ENABLE"] == "0"
    assert "HCCL_CONNECT_TIMEOUT" not in applied and "TASK_QUEUE_ENABLE" not in applied
    assert env["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    assert int(env["ACLNN_CACHE_LIMIT"]) > 10000
    assert applied == {name: env[name] for name in applied}
    assert set(applied) == set(NPU_ENV_DEFAULTS) - {"HCCL_CONNECT_TIMEOUT", "TASK_QUEUE_ENABLE"}


def test_npu_defaults_set_torch_npu_switches(monkeypatch):
    compile_calls = []
    fake_npu = SimpleNamespace(
        set_compile_mode=lambda **kwargs: compile_calls.append(kwargs),
        config=SimpleNamespace(allow_internal_format=True),
    )
    monkeypatch.setattr(npu, "import_torch_npu", lambda: SimpleNamespace(npu=fake_npu))
    env: dict[str, str] = {}
    applied = apply_npu_defaults(env)
    assert compile_calls == [{"jit_compile": False}]
    assert fake_npu.config.allow_internal_format is False
    assert "torch.npu.set_compile_mode" in applied
    assert int(env["HCCL_CONNECT_TIMEOUT"]) >= 600


def test_resolving_to_npu_applies_the_defaults(monkeypatch):
    use_probes(monkeypatch, NPU_910B, NO_CUDA)
    monkeypatch.setenv("CPU_AFFINITY_CONF", "0")
    resolve_runtime("auto")
    assert os.environ["TASK_QUEUE_ENABLE"] == "2"
    assert os.environ["CPU_AFFINITY_CONF"] == "0"


def test_resolving_to_cuda_applies_no_npu_defaults(monkeypatch):
    use_probes(monkeypatch, NO_NPU, AMPERE)
    resolve_runtime("auto")
    assert not set(NPU_ENV_DEFAULTS) & set(os.environ)


def test_probes_on_this_cpu_machine_report_nothing_and_do_not_raise():
    assert npu.probe_npu() == NpuProbe(installed=False)
    assert device.probe_cuda().device_count == 0


def test_npu_probe_turns_a_broken_torch_npu_into_an_import_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())

    def broken_import():
        raise OSError("libascendcl.so: cannot open shared object file")

    monkeypatch.setattr(npu, "import_torch_npu", broken_import)
    probe = npu.probe_npu()
    assert probe.installed and not probe.available
    assert "libascendcl.so" in probe.import_error


class RecordingUnet:
    """Stands in for UNet2DConditionModel: building a real one costs seconds of diffusers imports."""

    def __init__(self) -> None:
        self.processors: list[object] = []

    def set_attn_processor(self, processor: object) -> None:
        self.processors.append(processor)


def test_unet_attention_uses_the_npu_processor_only_on_npu(monkeypatch):
    from diffusers.models import attention_processor

    # AttnProcessorNPU refuses construction unless diffusers believes torch_npu is importable.
    monkeypatch.setattr(attention_processor, "is_torch_npu_available", lambda: True)
    unet = RecordingUnet()
    configure_unet_attention(unet, Runtime("cuda", 1, "bf16"))
    configure_unet_attention(unet, Runtime("cpu", 1, "no"))
    assert unet.processors == []  # diffusers' default SDPA processor stays
    configure_unet_attention(unet, Runtime("npu", 1, "bf16"))
    assert [type(p) for p in unet.processors] == [attention_processor.AttnProcessorNPU]


def test_build_accelerator_on_cpu():
    from accelerate.state import AcceleratorState

    try:
        accelerator = build_accelerator(Runtime("cpu", 1, "no"), grad_accum=3)
        assert accelerator.device.type == "cpu"
        # cpu=True is what makes torchrun-started CPU processes join one group (NOTES.md); accelerate
        # 1.15 exposes it only as this private flag.
        assert accelerator.state._cpu
        assert accelerator.mixed_precision == "no"
        assert accelerator.gradient_accumulation_steps == 3
    finally:
        # Accelerate's state is a process-wide singleton; leave none behind for other tests.
        AcceleratorState._reset_state(reset_partial_state=True)


def test_num_threads_sets_torch_cpu_threads() -> None:
    from tuner.runtime.device import set_cpu_threads

    before = torch.get_num_threads()
    try:
        set_cpu_threads(1)
        assert torch.get_num_threads() == 1
        set_cpu_threads(None)  # unset: torch's own default stays
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_fused_adamw_probe_passes_a_working_kernel_and_says_why_not_otherwise(monkeypatch):
    probe = npu.fused_adamw_failure.__wrapped__  # uncached: each case steps again
    assert probe("cpu") is None  # torch's fused CPU AdamW lands where foreach does
    assert probe("meta").startswith("RuntimeError: `fused=True` requires")
    # A kernel that runs but updates nothing (the case torch's device list cannot rule out).
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *args, **kwargs: None)
    assert probe("cpu").startswith("its step differs from foreach AdamW's")


@pytest.mark.parametrize(
    ("device_type", "asked", "pinned"),
    [
        ("cuda", None, True),
        ("npu", None, False),
        ("cpu", None, False),
        ("npu", True, True),
        ("cuda", False, False),
    ],
)
def test_pin_memory_is_on_for_cuda_and_on_npu_only_when_asked(device_type, asked, pinned):
    assert device.pin_memory_for(device_type, asked) is pinned
