"""Load-time fast paths for Qwen-VL models: same math, fewer or faster kernels.

* `linear_patch_embed` (on by default, `model.linear_patch_embed`): the vision tower's patch embedding is
  a Conv3d whose stride equals its kernel, i.e. one matrix product per patch. Run as a Linear over the
  flattened patch it skips the 5-D convolution path (on NPUs a Conv3d falls back to a slow kernel, on
  CPU and CUDA it is still an im2col away from the GEMM it really is).
* `apply_npu_fused_kernels` (opt-in, `model.npu_fused_kernels`): RMSNorm, SwiGLU MLPs and rotary
  embeddings through torch_npu's fused operators. Each operator sits behind a `FusedOps` field, so the
  same patch runs on CPU with `reference_ops()` and is tested against the unpatched model there.
* `apply_liger_kernels` (opt-in, CUDA): Liger-Kernel's own patch for the family, when it is installed.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tuner.config.schema import ModelConfig
from tuner.errors import ConfigError

_LIGER_PATCHES = {
    "qwen2_vl": "apply_liger_kernel_to_qwen2_vl",
    "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl",
    "qwen3_vl": "apply_liger_kernel_to_qwen3_vl",
    "qwen3_vl_moe": "apply_liger_kernel_to_qwen3_vl_moe",
}


class LinearPatchEmbedding(torch.nn.Module):
    """A stride == kernel Conv3d as the Linear it is: weight (out, in * t * h * w), the conv's bias.

    Takes the (patches, in, t, h, w) tensor the patch embedding builds and returns (patches, out), which
    the patch embedding's own `.view(-1, embed_dim)` leaves as it is. `weight` keeps the conv's dtype, so
    `patch_embed.proj.weight.dtype` (which the patch embedding casts its input to) still answers.
    """

    def __init__(self, conv: torch.nn.Conv3d) -> None:
        super().__init__()
        if tuple(conv.stride) != tuple(conv.kernel_size) or any(p != 0 for p in conv.padding):
            raise ValueError(f"only a stride == kernel, unpadded Conv3d is a Linear; got {conv}")
        self.kernel_size = tuple(conv.kernel_size)
        self.in_channels = conv.in_channels
        self.weight = torch.nn.Parameter(
            conv.weight.detach().reshape(conv.out_channels, -1).clone(),
            requires_grad=conv.weight.requires_grad,
        )
        self.bias = (
            torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
            if conv.bias is not None
            else None
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches.reshape(patches.shape[0], -1), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, kernel_size={self.kernel_size}, out={self.weight.shape[0]}"


def linear_patch_embed(model: torch.nn.Module) -> int:
    """Replace every vision patch embedding's Conv3d (`...patch_embed.proj`) with `LinearPatchEmbedding`.

    Returns how many were replaced (one for every family in transformers 5.23; 0 when already done).
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        if name.endswith("patch_embed") and isinstance(getattr(module, "proj", None), torch.nn.Conv3d):
            module.proj = LinearPatchEmbedding(module.proj)
            replaced += 1
    return replaced


@dataclass(frozen=True)
class FusedOps:
    """The fused operators the NPU patch calls, with torch_npu's signatures."""

    # (x, weight, eps) -> weight * x / rms(x), as npu_rms_norm's first output.
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    # (x, cos, sin) -> x * cos + rotate_half(x) * sin, as npu_rotary_mul.
    rotary_mul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # (x) -> silu(first half of the last dim) * second half, as npu_swiglu(x, dim=-1).
    swiglu: Callable[[torch.Tensor], torch.Tensor]


def _reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As the models' RMSNorm: normalise in fp32, round back to the input dtype, then scale.
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _reference_rotary_mul(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _reference_swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def reference_ops() -> FusedOps:
    """The fused operators' math in plain torch: what the patch is tested with on CPU."""
    return FusedOps(rms_norm=_reference_rms_norm, rotary_mul=_reference_rotary_mul, swiglu=_reference_swiglu)


def npu_ops() -> FusedOps:
    """torch_npu's fused operators; a ConfigError that says what to install when torch_npu is missing."""
    try:
        import torch_npu
    except ImportError as error:
        raise ConfigError(
            f"model.npu_fused_kernels needs torch_npu, which cannot be imported ({error})",
            hint="install the ascend extra on an Ascend host with CANN, or set model.npu_fused_kernels=false",
        ) from error
    return FusedOps(
        rms_norm=lambda x, weight, eps: torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0],
        rotary_mul=torch_npu.npu_rotary_mul,
        swiglu=lambda x: torch_npu.npu_swiglu(x, dim=-1),
    )


@dataclass
class FusedKernelsPatch:
    """What `apply_npu_fused_kernels` changed; `remove()` puts the original code back."""

    rms_norms: int = 0
    mlps: int = 0
    rotary_functions: list[str] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def apply_npu_fused_kernels(model: torch.nn.Module, ops: FusedOps | None = None) -> FusedKernelsPatch:
    """Route every RMSNorm, SwiGLU MLP and text rotary embedding of a Qwen-VL model through `ops`.

    `ops` defaults to `npu_ops()`. RMSNorms are the modules with `weight` and `variance_epsilon` (the
    language model's norms, Qwen3-VL's q/k norms, Qwen2.5-VL's vision norms); SwiGLU MLPs are those with
    `gate_proj`/`up_proj`/`down_proj` and a SiLU activation (the language model's, Qwen2.5-VL's vision
    blocks'); Qwen2-VL and Qwen3-VL vision MLPs are GELU and stay as they are. The rotary embedding is a
    function of the modeling module (transformers 5.23), so it is replaced there, for every model of
    that family in the process, until `remove()`.
    """
    ops = ops or npu_ops()
    patch = FusedKernelsPatch()
    modeling_modules: set[str] = set()
    for module in model.modules():
        if _is_rms_norm(module):
            _set_forward(module, _rms_norm_forward(module, ops), patch)
            patch.rms_norms += 1
            modeling_modules.add(type(module).__module__)
        elif _is_swiglu_mlp(module):
            _set_forward(module, _swiglu_forward(module, ops), patch)
            patch.mlps += 1
    for module_name in sorted(modeling_modules):
        modeling = sys.modules.get(module_name) or importlib.import_module(module_name)
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        if original is None:
            continue
        modeling.apply_rotary_pos_emb = _rotary_function(ops)
        patch.rotary_functions.append(f"{module_name}.apply_rotary_pos_emb")
        patch._undo.append(
            lambda modeling=modeling, original=original: setattr(modeling, "apply_rotary_pos_emb", original)
        )
    return patch


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def _is_swiglu_mlp(module: torch.nn.Module) -> bool:
    has_projections = all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
    # transformers 5.23 maps "silu" to its own SiLUActivation, not torch.nn.SiLU.
    activation = type(getattr(module, "act_fn", None)).__name__
    return has_projections and activation in ("SiLU", "SiLUActivation")


def _set_forward(module: torch.nn.Module, forward: Callable, patch: FusedKernelsPatch) -> None:
    # An instance attribute shadows the class's forward; deleting it restores the original.
    module.forward = forward
    patch._undo.append(lambda: delattr(module, "forward"))


def _rms_norm_forward(module: torch.nn.Module, ops: FusedOps) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(hidden_states, module.weight, module.variance_epsilon)

    return forward


def _swiglu_forward(module: torch.nn.Module, ops: FusedOps) -> Callable[[torch.Tensor], torch.Tensor]:
    # gate_proj and up_proj stay separate layers (LoRA may wrap either), so their outputs are joined
    # for the one fused activation instead of fusing the weights.
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        gate_up = torch.cat((module.gate_proj(hidden_states), module.up_proj(hidden_states)), dim=-1)
        return module.down_proj(ops.swiglu(gate_up))

    return forward


def _rotary_function(ops: FusedOps) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return ops.rotary_mul(q, cos, sin), ops.rotary_mul(k, cos, sin)

    return apply_rotary_pos_emb


def apply_liger_kernels(model: torch.nn.Module, family: str) -> bool:
    """Liger-Kernel's patch for `family` on `model` (CUDA only); False when liger_kernel is not installed.

    Cross-entropy stays the model's own (Liger's fused linear cross-entropy replaces the forward that
    PEFT wraps), and so does the rotary embedding: Liger patches a module function whose signature
    has changed across transformers releases. RMSNorm, LayerNorm and SwiGLU kernels are Liger's.
    """
    try:
        liger = importlib.import_module("liger_kernel.transformers")
    except ImportError:
        return False
    apply = getattr(liger, _LIGER_PATCHES.get(family, ""), None)
    if apply is None:
        return False
    apply(
        model=model,
        rope=False,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
    return True


def apply_fast_paths(
    model: torch.nn.Module, family: str, device_type: str, model_options: ModelConfig
) -> None:
    """The load-time patches `model_options` (the run's `model` section) asks for, before LoRA is added.

    Keys: `linear_patch_embed` (default on), `npu_fused_kernels` (default off; NPU runs only) and
    `liger_kernels` (default off; CUDA runs with liger_kernel installed).
    """
    if model_options.linear_patch_embed:
        linear_patch_embed(model)
    if model_options.npu_fused_kernels:
        if device_type != "npu":
            raise ConfigError(
                f"model.npu_fused_kernels needs an Ascend NPU; this run is on {device_type}",
                hint="set model.npu_fused_kernels=false",
            )
        apply_npu_fused_kernels(model)
    wants_liger = model_options.liger_kernels
    if wants_liger and (device_type != "cuda" or not apply_liger_kernels(model, family)):
        raise ConfigError(
            f"model.liger_kernels needs CUDA and the liger-kernel package (this run: {device_type})",
            hint="pip install liger-kernel on a CUDA host, or set model.liger_kernels=false",
        )
