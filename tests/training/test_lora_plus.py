"""LoRA+ (`lora.lr_ratio`): the B matrices' learning rate, as PEFT's `create_loraplus_optimizer` sets it."""

from __future__ import annotations

import pytest
import torch
from peft import LoHaConfig, LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer

from tuner.errors import ConfigError
from tuner.training.optim import build_optimizer, lora_plus_groups


def _model(config) -> torch.nn.Module:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return get_peft_model(base, config)


def _lr_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(parameter): group["lr"] for group in optimizer.param_groups for parameter in group["params"]}


def test_b_matrices_learn_at_the_ratio_as_peft_sets_them() -> None:
    model = _model(LoraConfig(r=2, target_modules=["0", "2"]))
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    groups = lora_plus_groups([{"params": trainable}], [model], 1e-4, 16.0)
    ours = build_optimizer("adamw", groups, 1e-4)
    peft = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16.0)
    assert _lr_of(ours) == pytest.approx(_lr_of(peft))
    assert sorted(set(_lr_of(ours).values())) == pytest.approx([1e-4, 16e-4])


def test_each_group_keeps_its_own_lr_and_name() -> None:
    model = _model(LoraConfig(r=2, target_modules=["0", "2"]))
    first = [p for name, p in model.named_parameters() if p.requires_grad and ".0." in name]
    second = [p for name, p in model.named_parameters() if p.requires_grad and ".2." in name]
    groups = [{"params": first, "name": "llm"}, {"params": second, "lr": 1e-5, "name": "vision"}]
    split = lora_plus_groups(groups, [model], 1e-4, 4.0)
    assert [(group["name"], group.get("lr")) for group in split] == [
        ("llm", None),
        ("llm B", 4e-4),
        ("vision", 1e-5),
        ("vision B", 4e-5),
    ]
    assert sum(len(group["params"]) for group in split) == len(first) + len(second)


def test_no_ratio_leaves_the_groups_and_a_ratio_without_b_matrices_is_refused() -> None:
    model = _model(LoraConfig(r=2, target_modules=["0"]))
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    assert lora_plus_groups(groups, [model], 1e-4, None) is groups
    loha = _model(LoHaConfig(r=2, target_modules=["0"]))
    with pytest.raises(ConfigError, match="no LoRA B matrices"):
        lora_plus_groups([{"params": [p for p in loha.parameters() if p.requires_grad]}], [loha], 1e-4, 16.0)
