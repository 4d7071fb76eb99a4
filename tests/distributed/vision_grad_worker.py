"""Run by torchrun from test_qwenvl_distributed.py: one Qwen-VL LoRA step under DDP where process 0's
batch has an image and process 1's is text-only, through the recipe's loss.

Arguments: MODEL_DIR DATA_FILE OUTPUT. Writes `grads-<rank>.json`: how many vision-tower LoRA parameters
the process has and how many got a gradient. Without the recipe's dummy image the step never finishes:
DDP waits for the vision LoRA gradients that process 1 never produces.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from tuner.data.conversations import load_conversations
from tuner.data.vl_encoding import collate_vl, encode_conversation, set_pixel_bounds
from tuner.models.qwenvl import add_lora, load_qwenvl, lora_target_modules
from tuner.recipes.qwenvl import causal_lm_loss, dummy_image_inputs


def main(model_dir: str, data_file: str, output: Path) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model, processor, family = load_qwenvl(model_dir, dtype=torch.float32)
    set_pixel_bounds(processor, min_pixels=56 * 56, max_pixels=64 * 64)
    peft_model = add_lora(model, lora_target_modules(model, family, ["llm", "vision"]), rank=2, alpha=4)
    conversation = load_conversations(data_file).conversations[accelerator.process_index]
    batch = collate_vl(
        [encode_conversation(processor, conversation)], pad_token_id=processor.tokenizer.pad_token_id
    )
    prepared = accelerator.prepare(peft_model)
    loss = causal_lm_loss(prepared, batch, dummy_image=dummy_image_inputs(processor))
    accelerator.backward(loss)
    vision = [p for name, p in peft_model.named_parameters() if p.requires_grad and ".visual." in name]
    record = {
        "has_image": "pixel_values" in batch,
        "vision_lora": len(vision),
        "vision_lora_with_grad": sum(p.grad is not None for p in vision),
        "loss": loss.item(),
    }
    (output / f"grads-{accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
