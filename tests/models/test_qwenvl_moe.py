"""Qwen3-VL-MoE: LoRA on the fused experts (and, when asked, the router) through PEFT's target_parameters;
it changes the output, saves, loads back in PEFT, merges exactly (PEFT and `tuner merge`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from peft import PeftModel
from safetensors.torch import load_file, save_file

from tuner.errors import ConfigError
from tuner.models.qwenvl import (
    add_lora,
    describe_parameter_groups,
    enable_gradient_checkpointing,
    load_adapter_checked,
    load_qwenvl,
    lora_parameter_groups,
    lora_target_modules,
    lora_target_parameters,
    save_adapter,
)
from tuner.models.qwenvl_merge import merge_qwenvl_adapter
from tuner.models.qwenvl_serve import write_serve_file

NAME = "qwen3-vl-moe"
# Long enough that every expert of both layers is routed some token.
INPUT_IDS = torch.arange(3, 43).reshape(2, 20)


def _load(tiny_model, name: str = NAME):
    model, processor, family = load_qwenvl(str(tiny_model(name)), dtype=torch.float32)
    return model.eval(), processor, family


def _with_lora(model, family, targets, rank=2, alpha=4):
    peft_model = add_lora(
        model,
        lora_target_modules(model, family, targets),
        rank,
        alpha,
        target_parameters=lora_target_parameters(model, family, targets),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: a LoRA that does nothing proves nothing
                parameter.normal_(std=0.3)
    return peft_model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def test_experts_and_router_are_parameter_targets_and_the_router_stays_frozen(tiny_model):
    model, _, family = _load(tiny_model)
    experts = lora_target_parameters(model, family, ["llm", "experts"])
    assert experts == [
        f"model.language_model.layers.{layer}.mlp.experts.{weight}"
        for layer in (0, 1)
        for weight in ("gate_up_proj", "down_proj")
    ]
    assert lora_target_parameters(model, family, ["llm"]) == []
    assert lora_target_parameters(model, family, ["router"]) == [
        "model.language_model.layers.0.mlp.gate.weight",
        "model.language_model.layers.1.mlp.gate.weight",
    ]
    # The parameter groups add no module: `llm` alone is the attention projections.
    assert lora_target_modules(model, family, ["llm", "experts"]) == lora_target_modules(
        model, family, ["llm"]
    )
    assert lora_target_modules(model, family, ["experts"]) == []

    peft_model = _with_lora(model, family, ["llm", "experts"])
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".mlp.experts." in name for name in trainable)
    assert not any(".mlp.gate." in name for name in trainable)
    assert all(".lora_" in name for name in trainable)


def test_parameter_groups_count_the_experts_and_the_router(tiny_model):
    model, _, family = _load(tiny_model)
    peft_model = _with_lora(model, family, ["llm", "experts", "router"], rank=2)
    groups = {group["name"]: group for group in lora_parameter_groups(peft_model, family, 1e-4)}
    assert set(groups) == {"llm", "experts", "router"}
    assert all(group["lr"] == 1e-4 for group in groups.values())
    text = model.config.text_config
    experts, hidden, inner = text.num_experts, text.hidden_size, text.moe_intermediate_size
    rank, layers = 2, text.num_hidden_layers
    # Per layer: gate_up_proj (hidden -> 2*inner) and down_proj (inner -> hidden), rank 2 per expert.
    per_layer = rank * experts * (hidden + 2 * inner) + rank * experts * (inner + hidden)
    count = {name: sum(p.numel() for p in group["params"]) for name, group in groups.items()}
    assert count["experts"] == layers * per_layer
    assert count["router"] == layers * rank * (hidden + experts)
    line = describe_parameter_groups(list(groups.values()))
    assert f"experts {count['experts']:,} (lr 0.0001)" in line
    assert f"router {count['router']:,} (lr 0.0001)" in line


def test_expert_targets_are_refused_for_dense_models_and_with_dropout(tiny_model):
    with pytest.raises(ConfigError, match="'experts' needs a mixture-of-experts model") as refused:
        lora_target_modules(torch.nn.Module(), "qwen2_5_vl", ["llm", "experts"])
    assert "remove experts" in refused.value.hint
    with pytest.raises(ConfigError, match="'router' needs a mixture-of-experts model"):
        lora_target_parameters(torch.nn.Module(), "qwen3_vl", ["router"])
    model, _, family = _load(tiny_model)
    with pytest.raises(ConfigError, match=r"lora\.dropout=0\.1 does not work with LoRA on the experts"):
        add_lora(
            model,
            [],
            2,
            4,
            dropout=0.1,
            target_parameters=lora_target_parameters(model, family, ["experts"]),
        )


def test_expert_lora_alone_changes_the_output(tiny_model):
    model, _, family = _load(tiny_model)
    base = _logits(model)
    peft_model = _with_lora(model, family, ["experts"])
    adapted = _logits(peft_model)
    assert (adapted - base).abs().max() > 1e-2
    with peft_model.disable_adapter():
        torch.testing.assert_close(_logits(peft_model), base, rtol=0, atol=0)


def test_checkpointing_gives_expert_and_router_lora_the_same_gradients(tiny_model):
    """PEFT applies a parameter LoRA inside the module's forward; recomputing that forward in backward
    (non-reentrant checkpointing) must give the gradients of the plain backward."""

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model, _, family = _load(tiny_model)
        torch.manual_seed(0)
        peft_model = _with_lora(model, family, ["llm", "experts", "router"])
        if checkpointing:
            enable_gradient_checkpointing(peft_model)
        peft_model.train()
        peft_model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
        return {name: p.grad for name, p in peft_model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert any(".mlp.experts." in name for name in plain) and any(".mlp.gate." in name for name in plain)
    assert all(grad.abs().sum() > 0 for grad in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def moe_adapter(tiny_model, tmp_path_factory):
    """A saved llm + experts + router adapter with random weights, and its logits before saving."""
    model, processor, family = _load(tiny_model)
    peft_model = _with_lora(model, family, ["llm", "experts", "router"])
    folder = tmp_path_factory.mktemp("moe") / "adapter"
    save_adapter(peft_model, folder, processor, {"base_model": f"tiny-{NAME}", "family": family})
    with peft_model.disable_adapter():
        base = _logits(peft_model)
    return folder, _logits(peft_model), base


def test_saved_expert_adapter_loads_in_peft_with_identical_outputs(tiny_model, moe_adapter):
    folder, expected, base = moe_adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    assert "model.language_model.layers.1.mlp.experts.down_proj" in config["target_parameters"]
    assert "model.language_model.layers.1.mlp.gate.weight" in config["target_parameters"]
    assert (expected - base).abs().max() > 1e-2

    model, _, _ = _load(tiny_model)
    loaded = PeftModel.from_pretrained(model, str(folder)).eval()
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)
    # tuner's own loader (infer, eval) refuses adapters whose weights miss a layer; these all land.
    model, _, _ = _load(tiny_model)
    torch.testing.assert_close(_logits(load_adapter_checked(model, folder).eval()), expected, rtol=0, atol=0)


def test_peft_merge_of_expert_lora_equals_the_unmerged_model(tiny_model, moe_adapter):
    folder, expected, _ = moe_adapter
    model, _, _ = _load(tiny_model)
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-4)  # fp32 rounding


def _published_layout_base(tiny_folder: Path, folder: Path) -> Path:
    """The tiny MoE saved as the published Qwen3-VL-MoE checkpoints are: expert stacks (experts, in, out)."""
    shutil.copytree(tiny_folder, folder)
    weights = load_file(str(folder / "model.safetensors"))
    transposed = {
        key: tensor.transpose(1, 2).contiguous() if ".mlp.experts." in key else tensor
        for key, tensor in weights.items()
    }
    save_file(transposed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("layout", ["transformers", "published"])
def test_tuner_merge_of_expert_lora_equals_the_unmerged_model(tiny_model, moe_adapter, tmp_path, layout):
    from transformers import Qwen3VLMoeForConditionalGeneration

    folder, expected, _ = moe_adapter
    base = str(tiny_model(NAME))
    if layout == "published":
        base = str(_published_layout_base(Path(base), tmp_path / "base"))
        # transformers transposes the stored stacks on load: the base is the same model.
        reloaded, _, _ = load_qwenvl(base, dtype=torch.float32)
        torch.testing.assert_close(_logits(reloaded.eval()), moe_adapter[2], rtol=0, atol=0)
    merged_dir = merge_qwenvl_adapter(base, folder, tmp_path / "merged")
    stored = load_file(str(merged_dir / "model.safetensors"))
    original = load_file(str(Path(base) / "model.safetensors"))
    # The merged checkpoint keeps the base's layout and key names.
    assert {k: v.shape for k, v in stored.items()} == {k: v.shape for k, v in original.items()}
    merged = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(merged_dir)).eval()
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-4)  # fp32 rounding


def test_serve_file_of_an_expert_adapter_serves_the_merged_model_only(moe_adapter):
    folder, _, _ = moe_adapter
    serve = write_serve_file(folder).read_text()
    assert "tuner merge --base" in serve and f"vllm serve {folder}-merged" in serve
    assert "--enable-lora" not in serve and "LoRARequest" not in serve


def test_cli_refuses_experts_on_a_dense_model_before_loading_it(capsys, tmp_path):
    argv = ["train", "qwenvl-lora", "--preset", "tiny-cpu", "--model", "tiny-qwen2.5-vl"]
    code, _, err = run_cli(capsys, *argv, "--targets", "llm,experts", "--output", str(tmp_path / "run"))
    assert code == 2
    assert "'experts' needs a mixture-of-experts model" in err and "qwen2_5_vl" in err


@pytest.mark.slow
def test_cli_trains_llm_and_expert_lora_for_two_steps(capsys, tmp_path, tiny_model):
    output = tmp_path / "run"
    argv = ["train", "qwenvl-lora", "--preset", "tiny-cpu", "--model", f"tiny-{NAME}", "--max-steps", "2"]
    code, out, err = run_cli(capsys, *argv, "--targets", "llm,experts", "--output", str(output))
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("trainable parameters:"))
    assert line.startswith("trainable parameters: llm ") and ", experts " in line and "router" not in line
    weights = load_file(str(output / "adapter_model.safetensors"))
    # Two steps moved the expert LoRA off its zero start; the router was not trained.
    assert any(
        ".mlp.experts." in key and "lora_B" in key and value.abs().max() > 0 for key, value in weights.items()
    )
    assert not any(".mlp.gate." in key for key in weights)
    assert "--enable-lora" not in (output / "serve.md").read_text()
    model, _, _ = _load(tiny_model)
    load_adapter_checked(model, output)
