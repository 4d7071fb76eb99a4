"""`lora.lr_vision` / `lora.lr_merger`: optimizer groups per module kind of the LoRA weights."""

from __future__ import annotations

import pytest
import torch

from tuner.errors import ConfigError
from tuner.models.qwenvl import (
    add_lora,
    describe_parameter_groups,
    load_qwenvl,
    lora_parameter_groups,
    lora_target_modules,
)


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_vision_and_merger_weights_get_their_own_learning_rates(tiny_model, name) -> None:
    model, _, family = load_qwenvl(str(tiny_model(name)), dtype=torch.float32)
    peft_model = add_lora(model, lora_target_modules(model, family, ("llm", "vision", "merger")), 2, 2)
    groups = lora_parameter_groups(peft_model, family, 1e-4, lr_vision=2e-5, lr_merger=5e-4)
    by_name = {group["name"]: group for group in groups}
    assert {name: group["lr"] for name, group in by_name.items()} == {
        "llm": 1e-4,
        "vision": 2e-5,
        "merger": 5e-4,
    }
    names = {id(p): n for n, p in peft_model.named_parameters()}
    assert all(".language_model." in names[id(p)] for p in by_name["llm"]["params"])
    assert all(".visual.blocks." in names[id(p)] for p in by_name["vision"]["params"])
    assert all("merger" in names[id(p)] for p in by_name["merger"]["params"])
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(len(group["params"]) for group in groups) == len(trainable)
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4, 2e-5, 5e-4]
    assert describe_parameter_groups(groups).startswith("trainable parameters: llm ")


def test_a_rate_for_a_group_that_is_not_trained_is_refused(tiny_model) -> None:
    model, _, family = load_qwenvl(str(tiny_model("qwen2-vl")), dtype=torch.float32)
    peft_model = add_lora(model, lora_target_modules(model, family, ("llm",)), 2, 2)
    [group] = lora_parameter_groups(peft_model, family, 1e-4)
    assert group["name"] == "llm" and group["lr"] == 1e-4
    with pytest.raises(ConfigError, match=r"lora\.lr_vision=2e-05 is set, but no vision weights"):
        lora_parameter_groups(peft_model, family, 1e-4, lr_vision=2e-5)
