"""Qwen-VL model side: family detection, loading refusals, LoRA targets, gradients, adapter round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file, save_file

from tuner.errors import ConfigError, ModelError
from tuner.models.qwenvl import (
    ADAPTER_METADATA_FILE,
    add_lora,
    detect_family,
    enable_gradient_checkpointing,
    load_adapter_checked,
    load_qwenvl,
    lora_target_modules,
    save_adapter,
)

FAMILIES = {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl"}
TARGET_ROOTS = {
    "llm": ("model.language_model.layers.",),
    "vision": ("model.visual.blocks.",),
    "merger": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
}
SAMPLES = [
    ((220, 30, 30), "What is in the picture?", "A red square."),
    ((30, 60, 220), "What colour is it?", "Blue, like the sea."),
    ((30, 180, 60), "Describe the image.", "A green field."),
]


def load(tiny_model, name: str):
    return load_qwenvl(str(tiny_model(name)), dtype=torch.float32)


def encode(processor, colour, question: str, answer: str) -> dict[str, torch.Tensor]:
    """One sample with labels on the assistant's answer only (built here, independent of tuner.data)."""
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    image = Image.new("RGB", (56, 56), colour)
    prompt_text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = f"{prompt_text}{answer}<|im_end|>"
    prompt_length = processor(text=[prompt_text], images=[image], return_tensors="pt")["input_ids"].shape[1]
    batch = dict(processor(text=[full_text], images=[image], return_tensors="pt"))
    labels = batch["input_ids"].clone()
    labels[:, :prompt_length] = -100
    batch["labels"] = labels
    return batch


def lora_b_grads(model: torch.nn.Module, root: str) -> list[float]:
    # On the first step lora_B is zero, so lora_A's gradient is zero too; lora_B's is what must flow.
    return [
        param.grad.abs().sum().item() if param.grad is not None else 0.0
        for name, param in model.named_parameters()
        if "lora_B" in name and f".{root}" in name
    ]


def perturb_adapter(model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)


@pytest.mark.parametrize("name", FAMILIES)
def test_detect_family_reads_model_type(tiny_model, name):
    assert detect_family(tiny_model(name)) == FAMILIES[name]


def test_detect_family_refuses_other_model_types(tmp_path):
    assert detect_family({"model_type": "qwen3_vl_moe"}) == "qwen3_vl_moe"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ModelError, match=r"unsupported model type 'llava'.*qwen2_vl, qwen2_5_vl, qwen3_vl"):
        detect_family(tmp_path)


def test_load_refuses_remote_code_unless_trusted(tiny_model, tmp_path):
    config = json.loads((tiny_model("qwen2-vl") / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as error:
        load_qwenvl(str(tmp_path), dtype=torch.float32)
    assert "--trust-remote-code" in error.value.hint


def test_load_refuses_pickle_weights_unless_allowed(tiny_model, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model("qwen2-vl"), folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no safetensors weights") as error:
        load_qwenvl(str(folder), dtype=torch.float32)
    assert "--allow-pickle" in error.value.hint
    model, _, family = load_qwenvl(str(folder), dtype=torch.float32, allow_pickle=True)
    assert family == "qwen2_vl" and isinstance(model, torch.nn.Module)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_targets_stay_inside_their_group(tiny_model, name):
    model, _, family = load(tiny_model, name)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    groups = {target: lora_target_modules(model, family, [target]) for target in TARGET_ROOTS}
    for target, names in groups.items():
        assert names and all(n.startswith(TARGET_ROOTS[target]) for n in names), (target, names)
        # Complete: every linear layer under the group's root is adapted (lm_head and norms are not linear
        # layers under these roots).
        assert set(names) == {n for n in linear_names if n.startswith(TARGET_ROOTS[target])}, target
    everything = lora_target_modules(model, family, ["llm", "vision", "merger"])
    assert sorted(everything) == sorted(n for names in groups.values() for n in names)
    assert not any("patch_embed" in n or n == "lm_head" for n in everything)


def test_llm_target_skips_the_vision_mlp_that_shares_its_names(tiny_model):
    # Qwen2.5-VL's vision MLP is also gate/up/down_proj: a suffix match would adapt it too.
    model, _, family = load(tiny_model, "qwen2.5-vl")
    vision = lora_target_modules(model, family, ["vision"])
    assert "model.visual.blocks.0.mlp.gate_proj" in vision
    assert not any(n.startswith("model.visual") for n in lora_target_modules(model, family, ["llm"]))
    peft_model = add_lora(model, lora_target_modules(model, family, ["llm"]), rank=2, alpha=2)
    adapted = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted and not any(".visual." in n for n in adapted)


def test_unknown_lora_target_lists_valid_ones(tiny_model):
    model, _, family = load(tiny_model, "qwen2-vl")
    with pytest.raises(ConfigError) as error:
        lora_target_modules(model, family, ["llm", "attention"])
    assert "'attention'" in error.value.message and "llm, vision, merger" in error.value.hint


def test_add_lora_freezes_everything_but_the_adapter(tiny_model):
    model, _, family = load(tiny_model, "qwen3-vl")
    peft_model = add_lora(model, lora_target_modules(model, family, ["llm", "merger"]), rank=2, alpha=4)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ConfigError, match="pissa"):
        add_lora(load(tiny_model, "qwen3-vl")[0], ["model.visual.merger.linear_fc1"], 2, 2, init="pissa")


def test_dora_variant_trains_magnitudes_and_refuses_expert_parameters(tiny_model):
    model, _, family = load(tiny_model, "qwen2.5-vl")
    peft_model = add_lora(model, lora_target_modules(model, family, ["llm"]), rank=2, alpha=4, variant="dora")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in trainable)
    assert peft_model.peft_config["default"].use_dora
    with pytest.raises(ConfigError, match=r"lora\.variant=dora"):
        add_lora(model, ["q_proj"], 2, 2, target_parameters=["mlp.experts.gate_up_proj"], variant="dora")
    with pytest.raises(ConfigError, match="'lokr' is not available for Qwen-VL"):
        add_lora(model, ["q_proj"], 2, 2, variant="lokr")


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpointing_keeps_gradients_in_every_targeted_group(tiny_model, name):
    torch.manual_seed(0)
    model, processor, family = load(tiny_model, name)
    peft_model = add_lora(model, lora_target_modules(model, family, ["llm", "vision", "merger"]), 4, 4)
    enable_gradient_checkpointing(peft_model)
    assert model.model.visual.blocks[0].gradient_checkpointing
    assert model.model.language_model.layers[0].gradient_checkpointing
    # transformers checkpoints only in training mode, and from_pretrained hands the model over in
    # eval mode: nothing is recomputed until someone calls train(), which the training loop does
    # (test_training_invariants.py checks that a real run recomputes).
    layer = model.model.language_model.layers[0]
    calls = []
    layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    assert not layer.training
    peft_model(**encode(processor, *SAMPLES[0])).loss.backward()
    assert len(calls) == 1  # forward only: no recompute in eval mode
    peft_model.zero_grad()
    calls.clear()
    peft_model.train()
    peft_model(**encode(processor, *SAMPLES[0])).loss.backward()
    assert len(calls) == 2  # forward, then the recompute in backward
    for root in ("language_model.layers", "visual.blocks", "visual.merger"):
        grads = lora_b_grads(peft_model, root)
        assert grads and min(grads) > 0, (root, grads)


def train(peft_model, batches, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    losses = []
    for step in range(steps):
        loss = peft_model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_llm_lora_overfits_a_few_samples_and_changes_only_lora(tiny_model):
    torch.manual_seed(0)
    model, processor, family = load(tiny_model, "qwen2.5-vl")
    peft_model = add_lora(model, lora_target_modules(model, family, ["llm"]), rank=8, alpha=16)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    batches = [encode(processor, *sample) for sample in SAMPLES]
    losses = train(peft_model, batches, steps=60, lr=1e-2)
    peft_model.eval()
    with torch.no_grad():
        final = [peft_model(**batch).loss.item() for batch in batches]
    assert losses[0] > 2.0 and max(final) < 0.05, (losses[:3], final)
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n and ".language_model." in n for n in changed)


@pytest.mark.parametrize(("target", "root"), [("vision", ".visual.blocks."), ("merger", ".visual.merger.")])
def test_vision_side_targets_change_only_their_group(tiny_model, target, root):
    torch.manual_seed(0)
    model, processor, family = load(tiny_model, "qwen2-vl")
    peft_model = add_lora(model, lora_target_modules(model, family, [target]), rank=4, alpha=4)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    train(peft_model, [encode(processor, *SAMPLES[0])], steps=2, lr=1e-2)
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(root in n and "lora_" in n for n in changed), changed


def test_saved_adapter_reloads_with_identical_logits(tiny_model, tmp_path):
    torch.manual_seed(0)
    path = str(tiny_model("qwen2.5-vl"))
    model, processor, family = load_qwenvl(path, dtype=torch.float32)
    peft_model = add_lora(model, lora_target_modules(model, family, ["llm", "vision", "merger"]), 4, 8)
    perturb_adapter(peft_model)
    peft_model.eval()
    batch = encode(processor, *SAMPLES[1])
    del batch["labels"]
    with torch.no_grad():
        trained_logits = peft_model(**batch).logits
    save_adapter(
        peft_model, tmp_path / "adapter", processor, {"base_model": "tiny-qwen2.5-vl", "family": family}
    )

    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"} <= files
    metadata = json.loads((tmp_path / "adapter" / ADAPTER_METADATA_FILE).read_text())
    assert metadata["family"] == "qwen2_5_vl" and metadata["transformers_version"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-qwen2.5-vl"

    base = load_qwenvl(path, dtype=torch.float32)[0]
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    checked = load_adapter_checked(load_qwenvl(path, dtype=torch.float32)[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained_logits)
        assert torch.equal(checked(**batch).logits, trained_logits)
        merged_logits = reloaded.merge_and_unload()(**batch).logits
    torch.testing.assert_close(merged_logits, trained_logits, atol=1e-4, rtol=1e-4)


def test_load_adapter_checked_refuses_mismatched_adapters(tiny_model, tmp_path):
    model, processor, family = load(tiny_model, "qwen2-vl")
    peft_model = add_lora(model, lora_target_modules(model, family, ["vision"]), 2, 2)
    save_adapter(peft_model, tmp_path / "qwen2", processor, {"family": family})

    # Qwen2-VL's vision MLP (fc1/fc2) does not exist in Qwen2.5-VL.
    with pytest.raises(ModelError, match="does not"):
        load_adapter_checked(load(tiny_model, "qwen2.5-vl")[0], tmp_path / "qwen2")

    weights_file = tmp_path / "qwen2" / "adapter_model.safetensors"
    weights = load_file(weights_file)
    renamed = next(key for key in weights if "blocks.1.attn.qkv.lora_A" in key)
    weights[renamed.replace("blocks.1", "blocks.7")] = weights.pop(renamed)
    save_file(weights, weights_file)
    with pytest.raises(ModelError, match=r"1 LoRA weights missing.*1 weights in the file fit no layer"):
        load_adapter_checked(load(tiny_model, "qwen2-vl")[0], tmp_path / "qwen2")


def test_adapter_folder_must_hold_an_adapter(tiny_model, tmp_path: Path):
    with pytest.raises(ModelError, match="not a PEFT adapter folder"):
        load_adapter_checked(load(tiny_model, "qwen2-vl")[0], tmp_path)
