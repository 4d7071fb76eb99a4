"""The one place that knows about CUDA vs NPU vs CPU, precision policy and hub settings."""

from tuner.runtime.device import Runtime, build_accelerator, configure_unet_attention, resolve_runtime
from tuner.runtime.hub import apply_hub_settings, resolve_model_source
from tuner.runtime.npu import apply_npu_defaults
from tuner.runtime.report import environment_report, format_environment_report

__all__ = [
    "Runtime",
    "apply_hub_settings",
    "apply_npu_defaults",
    "build_accelerator",
    "configure_unet_attention",
    "environment_report",
    "format_environment_report",
    "resolve_model_source",
    "resolve_runtime",
]
